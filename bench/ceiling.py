"""The Python ceiling for small responses: a bare aiohttp server answering fixed bytes from
memory over TLS (same event loop policy as the gateway: the stdlib asyncio loop).

Usage: ``python bench/ceiling.py BODY_FILE CERT KEY`` → prints ``PORT <n>`` when listening;
runs until SIGTERM/SIGINT.
"""
from __future__ import annotations

import asyncio
import signal
import ssl
import sys

from aiohttp import web


async def main(body_path: str, cert: str, key: str) -> None:
    body = open(body_path, "rb").read()
    headers = {"Content-Type": "text/xml", "ETag": '"bench"', "Cache-Control": "max-age=3600"}

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
