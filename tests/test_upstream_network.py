"""Where connections go: SSRF guard on resolved addresses, parent proxy, blind tunnels."""
from __future__ import annotations

import asyncio
import base64

import pytest
from aiohttp import web

from gateway.settings import ParentProxySettings
from gateway.upstream import UpstreamError
from upstream_support import (GET, FakeServer, new_client, pki, settings, stop_all,  # noqa: F401
                              upstream)


class ConnectProxy:
    """A minimal CONNECT-only parent proxy that records what it was asked."""

    def __init__(self, need_auth: str | None = None) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.need_auth = need_auth
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    async def start(self) -> "ConnectProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            self.requests.append((lines[0], headers))
            method, target, _ = lines[0].split(" ", 2)
            if self.need_auth and headers.get("Proxy-Authorization") != self.need_auth:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Content-Length: 0\r\n\r\n")
                await writer.drain()
                return
            host, port = target.rsplit(":", 1)
            up_r, up_w = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()

            async def pipe(r, w):
                try:
                    while data := await r.read(65536):
                        w.write(data)
                        await w.drain()
                except (ConnectionError, asyncio.CancelledError):
                    pass
                finally:
                    w.close()
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server.close_clients() if hasattr(self._server, "close_clients") else None
            await asyncio.wait_for(self._server.wait_closed(), 2)


async def echo_server():
    async def handle(reader, writer):
        try:
            while data := await reader.read(1024):
                writer.write(b"echo:" + data)
                await writer.drain()
        finally:
            writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def deny_loopback(calls):
    def guard(host, ip):
        calls.append((host, ip))
        return "loopback address" if ip.startswith("127.") or ip == "::1" else None
    return guard


async def test_guard_applies_to_resolved_address_and_ip_literals_but_not_overrides(pki):
    async def handler(request, srv):
        if request.path == "/to-internal":
            return web.Response(status=302, headers={"Location": f"https://localhost:{srv.port}/"})
        return web.Response(text="internal")

    calls: list = []
    served = FakeServer(pki, ["localhost", "127.0.0.1", "ok.test"], handler)
    async with upstream(pki, {"ok.test": served}, known=["localhost"],
                        client_kw=dict(address_guard=deny_loopback(calls))) as (client, _, srv):
        with pytest.raises(UpstreamError) as ei:       # name → 127.0.0.1: refused
            await client.request(GET(f"https://localhost:{srv.port}/"))
        assert ei.value.reason == "ssrf" and ei.value.status == 403
        assert "loopback" in ei.value.message
        assert ("localhost", "127.0.0.1") in calls
        with pytest.raises(UpstreamError) as ei:       # IP literal: refused too
            await client.request(GET(f"https://127.0.0.1:{srv.port}/"))
        assert ei.value.reason == "ssrf"
        assert srv.count == 0
        # the operator's override is trusted
        resp = await client.request(GET("https://ok.test/"))
        assert await resp.read() == b"internal"
        assert srv.count == 1
        # … but a redirect from there to an internal address is refused at that hop
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET("https://ok.test/to-internal", follow_redirects=True))
        assert ei.value.reason == "ssrf"
        assert srv.count == 2
        assert not any(h == "ok.test" for h, _ in calls)


async def test_parent_proxy_for_requests_with_credentials(pki, monkeypatch):
    async def handler(request, srv):
        return web.Response(text="via proxy")

    srv = await FakeServer(pki, ["localhost"], handler).start()
    expected = "Basic " + base64.b64encode(b"corp:hunter2").decode()
    proxy = await ConnectProxy(need_auth=expected).start()
    parent = ParentProxySettings(url=f"http://127.0.0.1:{proxy.port}", username="corp",
                                 password="hunter2")
    client, _ = new_client(settings({}, pki.ca_file, parent_proxy=parent), ["localhost"])
    await client.start()
    try:
        resp = await client.request(GET(f"https://localhost:{srv.port}/x"))
        assert resp.status == 200 and await resp.read() == b"via proxy"
        line, headers = proxy.requests[0]
        assert line == f"CONNECT localhost:{srv.port} HTTP/1.1"
        assert headers["Proxy-Authorization"] == expected
        assert srv.log[0].host == f"localhost:{srv.port}"
        assert "Proxy-Authorization" not in srv.log[0].headers
    finally:
        await client.close()
        await proxy.stop()
        await stop_all(srv)


async def test_parent_proxy_no_proxy_hosts_go_direct(pki):
    async def handler(request, srv):
        return web.Response(text="direct")

    srv = await FakeServer(pki, ["localhost"], handler).start()
    server, port = await echo_server()
    proxy = await ConnectProxy().start()
    parent = ParentProxySettings(url=f"http://127.0.0.1:{proxy.port}",
                                 no_proxy=("other.example", ".LOCALHOST"))
    client, _ = new_client(settings({}, pki.ca_file, parent_proxy=parent), ["localhost"])
    await client.start()
    try:
        resp = await client.request(GET(f"https://localhost:{srv.port}/x"))
        assert resp.status == 200 and await resp.read() == b"direct"
        reader, writer = await client.open_tunnel("localhost", port)
        writer.write(b"hi")
        assert await reader.readexactly(7) == b"echo:hi"
        writer.close()
        assert proxy.requests == []              # neither went through the parent
        assert srv.count == 1
    finally:
        await client.close()
        await proxy.stop()
        server.close()
        await server.wait_closed()
        await stop_all(srv)


def test_no_proxy_matching_and_validation():
    from gateway.settings import ConfigError
    p = ParentProxySettings(url="http://proxy:3128",
                            no_proxy=("registry.corp", ".corp.example", "*.lab.test"))
    assert p.bypasses("registry.corp") and p.bypasses("REGISTRY.corp.")
    assert not p.bypasses("x.registry.corp")     # a bare name is that host only
    assert p.bypasses("corp.example") and p.bypasses("a.b.corp.example")
    assert p.bypasses("lab.test") and p.bypasses("x.lab.test")
    assert not p.bypasses("notcorp.example") and not p.bypasses("ghcr.io")
    for bad in ("http://x", "*", "a b", "host:80"):
        with pytest.raises(ConfigError):
            ParentProxySettings(no_proxy=(bad,)).validate("upstream.parent_proxy")


async def test_tunnels_override_guard_and_parent_proxy(pki):
    server, port = await echo_server()
    proxy = await ConnectProxy().start()
    calls: list = []
    client, _ = new_client(settings({"echo.test": f"127.0.0.1:{port}"}, pki.ca_file),
                           ["echo.test"], address_guard=deny_loopback(calls))
    proxied, _ = new_client(settings({}, pki.ca_file, parent_proxy=ParentProxySettings(
        url=f"http://127.0.0.1:{proxy.port}")), ["echo.test"])
    try:
        reader, writer = await client.open_tunnel("echo.test", 443)   # override: other port
        writer.write(b"ping")
        assert await reader.readexactly(9) == b"echo:ping"
        writer.close()
        with pytest.raises(UpstreamError) as ei:
            await client.open_tunnel("localhost", port)
        assert ei.value.reason == "ssrf"
        with pytest.raises(UpstreamError) as ei:
            await client.open_tunnel("127.0.0.1", port)
        assert ei.value.reason == "ssrf"
        reader, writer = await proxied.open_tunnel("localhost", port)
        writer.write(b"hi")
        assert await reader.readexactly(7) == b"echo:hi"
        writer.close()
        assert proxy.requests[0][0] == f"CONNECT localhost:{port} HTTP/1.1"
        with pytest.raises(UpstreamError) as ei:
            await client.open_tunnel("nothing.invalid", 443)
        assert ei.value.reason == "connect"
    finally:
        await proxy.stop()
        server.close()
        await server.wait_closed()
