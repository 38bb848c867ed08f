"""The Python ceiling for small responses: a bare aiohttp server answering fixed bytes from
memory over TLS (same event loop policy as the gateway: the stdlib asyncio loop).

Usage: ``python bench/ceiling.py BODY_FILE CERT KEY`` → prints ``PORT <n>`` when listening;
runs until SIGTERM/SIGINT.
"""
from __future__ import annotations

import asyncio
import ssl
import sys

from aiohttp import web

from serve_util import serve_until_signal


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
    await serve_until_signal(runner, site)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
