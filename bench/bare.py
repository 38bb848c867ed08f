"""The floor for small responses: a bare ``asyncio.Protocol`` HTTP/1.1 server over stdlib TLS.

It answers every request with the same pre-rendered head + body from a dict (one ``write`` per
answer), keeps connections alive, parses nothing beyond the end of the head (requests have no
body here) and logs nothing. What the gateway spends per small hit above this is its own Python;
the issue's target is ≤ 1.5× this server's CPU per request.

Usage: ``python bench/bare.py BODY_FILE CERT KEY [--gateway-tls]`` → prints ``PORT <n>`` when
listening; runs until SIGTERM/SIGINT. Same event loop as the gateway (stdlib asyncio).

``--gateway-tls``: the same server over the gateway's TLS layer instead of asyncio's
(``gateway/proxy/tls_upgrade.py``: ``start_tls`` with ``LeanSSLProtocol``), the reference that
tells how much of the gateway's figure is its TLS glue and how much its own work per request.
"""
from __future__ import annotations

import asyncio
import signal
import ssl
import sys
from pathlib import Path


def render(body: bytes) -> bytes:
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nETag: \"bench\"\r\n"
            f"Cache-Control: max-age=3600\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


class BareHTTP(asyncio.Protocol):
    """Buffer bytes; for every complete head, write the one answer (any path: ``answers`` maps
    paths to responses, the default for anything else)."""

    def __init__(self, answers: dict[bytes, bytes], default: bytes) -> None:
        self.answers, self.default = answers, default
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            line_end = buf.find(b"\r\n")
            parts = buf[:line_end].split(b" ")
            path = parts[1] if len(parts) > 2 else b""
            out.append(self.answers.get(path, self.default))
            buf = buf[end + 4:]
        self.buf = buf
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[union-attr]


class GatewayTLS(asyncio.Protocol):
    """Accepts plain TCP and upgrades it with the gateway's ``start_tls`` (as the proxy does
    after CONNECT), then hands the connection to a :class:`BareHTTP`."""

    def __init__(self, app: BareHTTP, ctx: ssl.SSLContext) -> None:
        self.app, self.ctx = app, ctx

    def connection_made(self, transport) -> None:  # type: ignore[override]
        asyncio.ensure_future(self._upgrade(transport))

    async def _upgrade(self, transport) -> None:
        from gateway.proxy.tls_upgrade import start_tls  # noqa: PLC0415 - only for this mode

        try:
            await start_tls(asyncio.get_running_loop(), transport, self.app, self.ctx)
        except (OSError, ssl.SSLError, ConnectionError):
            transport.close()


async def main(body_path: str, cert: str, key: str, mode: str = "") -> None:
    answer = render(open(body_path, "rb").read())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    if mode == "--gateway-tls":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        server = await loop.create_server(
            lambda: GatewayTLS(BareHTTP({b"/small.pom": answer}, answer), ctx),
            "127.0.0.1", 0, backlog=1024)
    else:
        server = await loop.create_server(lambda: BareHTTP({b"/small.pom": answer}, answer),
                                          "127.0.0.1", 0, ssl=ctx, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
