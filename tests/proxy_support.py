"""Helpers for the proxy/TLS/policy tests: settings, an in-memory handler, a running proxy.

The handler stands in for the cache/upstream pipeline. It answers from memory by path:

* ``/hello``            200 text naming scheme, host and target
* ``/stream/<n>``       200 with n bytes generated on the fly (``?chunked=1``: length unknown)
* ``/echo``             200 JSON: method, target, headers, body length and sha256 (body streamed)
* ``/v2/``              503 (what a broken registry answers)
* ``/fail-mid/<n>``     200 declaring 2n bytes, raising after n
* ``/file``             a FileBody over ``handler.file_path``
* ``/slow/<seconds>``   200 after sleeping, streaming 5 chunks over the delay
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import ssl
from typing import Awaitable, Callable, Optional

from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict

from gateway.exchange import BytesBody, Exchange, FileBody, Response, StreamBody
from gateway.observability.metrics import Metrics
from gateway.policy import Policy
from gateway.proxy import ProxyServer
from gateway.settings import load_settings
from gateway.tls import CertificateAuthority, LeafIssuer
from gateway.upstream import UpstreamClient

PASSWORD = "s3cret-proxy-pw"
CHUNK = b"\xa5" * (256 * 1024)


def make_settings(tmp_path, rules=None, auth: bool = False, proxy: Optional[dict] = None,
                  overrides: Optional[dict] = None, **policy):
    data = {"server": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data"),
                       "drain_grace": 5},
            "proxy": dict(proxy or {})}
    if rules is not None:
        # the proxy tests use plain HTTP through registry.test (off by default)
        data["policy"] = {"rules": rules, "allow_plain_http": True, **policy}
    if auth:
        data["proxy"]["auth"] = {"enabled": True, "username": "scanner"}
    for k, v in (overrides or {}).items():
        data.setdefault(k, {}).update(v)
    return load_settings(env={"TRIVY_GATEWAY_PROXY_PASSWORD": PASSWORD}, overrides=data)


async def generate(n: int, chunk: bytes = CHUNK):
    view = memoryview(chunk)
    while n > 0:
        piece = view[:min(n, len(chunk))]
        n -= len(piece)
        yield piece


class MemoryHandler:
    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.file_path: Optional[str] = None
        self.closed_bodies = 0

    async def _closed(self) -> None:
        self.closed_bodies += 1

    async def handle(self, ex: Exchange) -> Response:
        self.exchanges.append(ex)
        path = ex.path
        text = {"Content-Type": "text/plain"}
        if path == "/hello":
            return Response(200, CIMultiDict(text),
                            BytesBody(f"hello {ex.scheme}://{ex.authority}{ex.target}\n".encode()))
        if path.startswith("/stream/"):
            n = int(path.rsplit("/", 1)[1])
            length = None if "chunked=1" in ex.query else n
            return Response(200, CIMultiDict({"Content-Type": "application/octet-stream"}),
                            StreamBody(generate(n), length=length, on_close=self._closed))
        if path == "/echo":
            size, digest = 0, hashlib.sha256()
            chunks = 0
            if ex.body is not None:
                async for chunk in ex.body:
                    size += len(chunk)
                    chunks += 1
                    digest.update(chunk)
            payload = {"method": ex.method, "scheme": ex.scheme, "host": ex.host, "port": ex.port,
                       "target": ex.target, "headers": list(ex.headers.items()),
                       "body_bytes": size, "body_chunks": chunks, "sha256": digest.hexdigest(),
                       "client": ex.client}
            return Response(200, CIMultiDict({"Content-Type": "application/json"}),
                            BytesBody(json.dumps(payload).encode()))
        if path == "/v2/":
            return Response(503, CIMultiDict(text), BytesBody(b"registry unavailable (test)\n"),
                            reason="Service Unavailable")
        if path.startswith("/fail-mid/"):
            n = int(path.rsplit("/", 1)[1])

            async def failing():
                async for piece in generate(n):
                    yield piece
                raise ConnectionResetError("upstream reset (test)")
            return Response(200, CIMultiDict(), StreamBody(failing(), length=2 * n,
                                                           on_close=self._closed))
        if path == "/file" and self.file_path:
            size = os.path.getsize(self.file_path)
            return Response(200, CIMultiDict(), FileBody(self.file_path, 0, size))
        if path.startswith("/slow/"):
            delay = float(path.rsplit("/", 1)[1])

            async def slow():
                for _ in range(5):
                    await asyncio.sleep(delay / 5)
                    yield b"x" * 1000
            return Response(200, CIMultiDict(), StreamBody(slow(), length=5000,
                                                           on_close=self._closed))
        return Response(404, CIMultiDict(text), BytesBody(b"not found\n"))


class FunctionDNS(AbstractResolver):
    """DNS answered by ``lookup(host, port) -> [ip, …]`` (the tests' resolver seam)."""

    def __init__(self, lookup: Callable[[str, int], Awaitable[list[str]]]) -> None:
        self._lookup = lookup

    async def resolve(self, host: str, port: int = 0, family=socket.AF_INET):
        return [{"hostname": host, "host": ip, "port": port, "proto": 0,
                 "family": socket.AF_INET6 if ":" in ip else socket.AF_INET,
                 "flags": socket.AI_NUMERICHOST} for ip in await self._lookup(host, port)]

    async def close(self) -> None:
        pass


class Gateway:
    """A running ProxyServer with everything it needs, for one test. Tunnels are opened by the
    production opener (``UpstreamClient.open_tunnel`` with the policy's SSRF guard), as in
    ``gateway/app.py``; ``resolver(host, port) -> [ip, …]`` stands in for DNS."""

    def __init__(self, settings, handler=None, open_tunnel=None, resolver=None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.policy = Policy(settings)
        self.ca = CertificateAuthority.load_or_create(settings)
        self.leaf_issuer = LeafIssuer(self.ca, settings, self.metrics)
        self.handler = handler or MemoryHandler()
        self.upstream = UpstreamClient(settings.upstream, self.metrics,
                                       address_guard=self.policy.address_allowed,
                                       dns=FunctionDNS(resolver) if resolver else None)
        self.open_tunnel = open_tunnel or self.upstream.open_tunnel
        self.server = ProxyServer(settings, self.policy, self.leaf_issuer, self.handler,
                                  self.metrics, self.open_tunnel)

    @property
    def ca_path(self) -> str:
        return str(self.ca.cert_path)

    @property
    def port(self) -> int:
        return self.server.address[1]

    @property
    def url(self) -> str:
        return self.server.url

    def metric(self, name: str, **labels) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


@contextlib.asynccontextmanager
async def running_gateway(settings, **kwargs):
    gw = Gateway(settings, **kwargs)
    await gw.server.start()
    try:
        yield gw
    finally:
        await gw.server.close()


async def raw_request(port: int, data: bytes, read_until_close: bool = True,
                      timeout: float = 5.0) -> bytes:
    """Send raw bytes to the proxy port and return what comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        async with asyncio.timeout(timeout):
            if read_until_close:
                out = await reader.read(-1)
            else:
                out = await reader.readuntil(b"\r\n\r\n")
        return out
    finally:
        writer.close()


def status_line(raw: bytes) -> str:
    return raw.split(b"\r\n", 1)[0].decode("latin-1")


# -- a gateway in its own process (honest RSS, real SIGTERM) -----------------------------------

def _serve_main(argv: list[str]) -> None:
    """``python tests/proxy_support.py DIR [RULE_HOST ...]``: serve until SIGTERM, then drain.

    Prints ``READY <port> <ca path>`` once listening; on SIGTERM stops accepting, prints
    ``DRAINING``, drains with ``server.drain_grace`` and exits 0.
    """
    import pathlib
    import signal

    from gateway.observability.logging import configure_logging
    from gateway.settings import LoggingSettings

    configure_logging(LoggingSettings(level="warning"))
    tmp = pathlib.Path(argv[0])
    hosts = argv[1:] or ["registry.test"]
    settings = make_settings(tmp, rules=[{"host": h, "action": "intercept"} for h in hosts])

    async def run() -> None:
        gw = Gateway(settings)
        await gw.server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(f"READY {gw.port} {gw.ca_path}", flush=True)
        await stop.wait()
        gw.server.stop_accepting()
        print("DRAINING", flush=True)
        finished = await gw.server.drain(float(settings.server.drain_grace))
        await gw.server.close()
        print(f"DRAINED {'clean' if finished else 'aborted'}", flush=True)

    asyncio.run(run())


if __name__ == "__main__":
    import sys
    _serve_main(sys.argv[1:])


async def read_response(reader) -> tuple[bytes, bytes]:
    """(head, body) of one response framed by Content-Length (none: no body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


async def open_intercepted(gw, host: str = "registry.test") -> tuple[asyncio.StreamReader,
                                                                     asyncio.StreamWriter]:
    """A client connection through ``CONNECT host:443`` and TLS with the gateway's leaf."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await writer.start_tls(ssl.create_default_context(cafile=gw.ca_path), server_hostname=host)
    return reader, writer
