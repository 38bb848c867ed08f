"""Blind tunnels to a local TLS server with its own CA, and the SSRF guard at connect time."""
from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest
from aiohttp import web

from gateway.settings import load_settings
from gateway.tls import CertificateAuthority, LeafIssuer
from proxy_support import make_settings, raw_request, running_gateway, status_line


class UpstreamTLS:
    """An aiohttp HTTPS server on 127.0.0.1 with a certificate from its own test CA."""

    def __init__(self, tmp_path) -> None:
        self.ca = CertificateAuthority.generate("upstream test CA")
        self.ca_file = tmp_path / "upstream-ca.pem"
        self.ca_file.write_bytes(self.ca.cert_pem)
        self.peers: list[str] = []

    def server_context(self) -> ssl.SSLContext:
        issuer = LeafIssuer(self.ca, load_settings(env={}))
        # one certificate naming "localhost" (the tunnel target)
        return issuer.context_for("localhost")

    async def start(self) -> int:
        async def hello(request: web.Request) -> web.Response:
            peer = request.transport.get_extra_info("peername")
            self.peers.append(f"{peer[0]}:{peer[1]}")
            return web.Response(text=f"upstream says hi to {request.host}\n")

        async def big(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse()
            resp.content_length = 4 * 1024 * 1024
            await resp.prepare(request)
            for _ in range(64):
                await resp.write(b"u" * 65536)
            return resp

        app = web.Application()
        app.router.add_get("/hello", hello)
        app.router.add_get("/big", big)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.server_context())
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def upstream(tmp_path):
    server = UpstreamTLS(tmp_path)
    server.port = await server.start()
    yield server
    await server.stop()


async def test_tunnel_keeps_upstream_certificate_and_keepalive(tmp_path, upstream):
    rules = [{"host": "localhost", "action": "tunnel", "ports": [upstream.port]}]
    async with running_gateway(make_settings(tmp_path, rules=rules)) as gw:
        # the client trusts only the *upstream* CA: it sees the real certificate, end to end
        ctx = ssl.create_default_context(cafile=str(upstream.ca_file))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            for _ in range(3):
                async with session.get(f"https://localhost:{upstream.port}/hello", proxy=gw.url,
                                       ssl=ctx) as r:
                    assert r.status == 200
                    assert await r.text() == f"upstream says hi to localhost:{upstream.port}\n"
                    assert "Via" not in r.headers             # not inspected, not rewritten
            async with session.get(f"https://localhost:{upstream.port}/big", proxy=gw.url,
                                   ssl=ctx) as r:
                assert len(await r.read()) == 4 * 1024 * 1024
        assert len(set(upstream.peers)) == 1      # three requests, one tunnel, one upstream conn
        assert gw.handler.exchanges == []         # nothing went through the handler
        assert gw.metric("trivy_gateway_tls_leaf_certificates_minted_total") == 0
        for _ in range(100):                      # the tunnel is logged/counted when it ends
            if gw.server.active_connections == 0:
                break
            await asyncio.sleep(0.02)
        down = gw.metric("trivy_gateway_tunnel_bytes_total", direction="downstream")
        up = gw.metric("trivy_gateway_tunnel_bytes_total", direction="upstream")
        assert down > 4 * 1024 * 1024 and up > 0


async def test_tunnel_with_curl_and_gateway_ca_is_not_enough(tmp_path, upstream):
    rules = [{"host": "localhost", "action": "tunnel", "ports": [upstream.port]}]
    async with running_gateway(make_settings(tmp_path, rules=rules)) as gw:
        url = f"https://localhost:{upstream.port}/hello"
        ok = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--noproxy", "", "--proxy", gw.url, "--cacert", str(upstream.ca_file), url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(ok.communicate(), 20)
        assert ok.returncode == 0, err
        assert out.decode().startswith("upstream says hi")
        # with only the gateway CA the tunnelled host's real certificate is not trusted
        bad = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--noproxy", "", "--proxy", gw.url, "--cacert", gw.ca_path, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await asyncio.wait_for(bad.communicate(), 20)
        assert bad.returncode == 60


async def test_catch_all_name_resolving_to_loopback_is_refused(tmp_path, upstream):
    # "localhost" matched only by the catch-all rule resolves to 127.0.0.1: SSRF guard refuses
    rules = [{"host": "*", "action": "tunnel", "ports": [upstream.port]}]
    async with running_gateway(make_settings(tmp_path, rules=rules)) as gw:
        raw = await raw_request(gw.port, f"CONNECT localhost:{upstream.port} HTTP/1.1\r\n"
                                         f"Host: localhost\r\n\r\n".encode())
        line = status_line(raw)
        assert line.startswith("HTTP/1.1 403 localhost resolves to 127.0.0.1 (loopback)"), line
        assert "catch-all" in line and "allow_private" in line
        assert gw.metric("trivy_gateway_denied_total", host="other", reason="ssrf") == 1
        assert upstream.peers == []
    # the same rule with allow_private: true connects
    rules[0]["allow_private"] = True
    async with running_gateway(make_settings(tmp_path / "b", rules=rules)) as gw:
        raw = await raw_request(gw.port, f"CONNECT localhost:{upstream.port} HTTP/1.1\r\n"
                                         f"Host: localhost\r\n\r\n".encode(), read_until_close=False)
        assert status_line(raw) == "HTTP/1.1 200 Connection established"


async def test_wildcard_name_resolving_to_metadata_address_is_refused(tmp_path):
    attempts = []

    async def resolver(host, port):                 # the resolver seam (a real setting path)
        attempts.append(host)
        return {"meta.cloud.test": ["169.254.169.254"], "inside.cloud.test": ["10.0.0.7"],
                "v6.cloud.test": ["fd00:ec2::254"]}[host]

    rules = [{"host": "*.cloud.test", "action": "tunnel"}]
    async with running_gateway(make_settings(tmp_path, rules=rules), resolver=resolver) as gw:
        for host, address, category in (("meta.cloud.test", "169.254.169.254", "metadata"),
                                         ("inside.cloud.test", "10.0.0.7", "private"),
                                         ("v6.cloud.test", "fd00:ec2::254", "metadata")):
            raw = await raw_request(gw.port, f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}\r\n\r\n"
                                    .encode())
            assert status_line(raw).startswith(
                f"HTTP/1.1 403 {host} resolves to {address} ({category})"), raw[:200]
        assert gw.metric("trivy_gateway_denied_total", host="other", reason="ssrf") == 3
    assert attempts == ["meta.cloud.test", "inside.cloud.test", "v6.cloud.test"]


async def test_ip_literal_targets_are_refused_unless_named(tmp_path, upstream):
    rules = [{"host": "*", "action": "intercept"},
             {"host": "127.0.0.1", "action": "tunnel", "ports": [upstream.port]}]
    async with running_gateway(make_settings(tmp_path, rules=rules)) as gw:
        for target in ("169.254.169.254:80", "169.254.169.254:443", "10.0.0.1:443", "[::1]:443"):
            raw = await raw_request(gw.port, f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            line = status_line(raw)
            assert line.startswith("HTTP/1.1 403 ") and "IP address" in line, line
        raw = await raw_request(gw.port, b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\n"
                                         b"Host: 169.254.169.254\r\nConnection: close\r\n\r\n")
        assert status_line(raw).startswith("HTTP/1.1 403 169.254.169.254 is an IP address")
        assert gw.metric("trivy_gateway_denied_total", host="other", reason="ssrf") == 5
        # an address a rule names exactly is allowed (and connects to loopback: exact rule)
        raw = await raw_request(gw.port, f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\n"
                                         f"Host: x\r\n\r\n".encode(), read_until_close=False)
        assert status_line(raw) == "HTTP/1.1 200 Connection established"
    assert gw.handler.exchanges == []


async def test_tunnel_connect_failure_is_502_with_reason(tmp_path):
    sock_server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead_port = sock_server.sockets[0].getsockname()[1]
    sock_server.close()
    await sock_server.wait_closed()
    rules = [{"host": "localhost", "action": "tunnel", "ports": [dead_port]}]
    async with running_gateway(make_settings(tmp_path, rules=rules)) as gw:
        raw = await raw_request(gw.port, f"CONNECT localhost:{dead_port} HTTP/1.1\r\n"
                                         f"Host: x\r\n\r\n".encode())
        line = status_line(raw)
        assert line.startswith(f"HTTP/1.1 502 cannot open a tunnel to localhost:{dead_port}"), line
        assert line.endswith("Connection refused"), line


async def test_open_tunnel_callback_errors_are_explained(tmp_path):
    from gateway.upstream.types import UpstreamError

    async def opener(host, port):
        if host == "ssrf.test":
            raise UpstreamError("ssrf", host, "ssrf.test resolves to 10.1.1.1 (private)")
        if host == "slow.test":
            raise UpstreamError("timeout", host, "connect timed out after 10s", status=504)
        raise UpstreamError("circuit_open", host, "circuit open for 30s")

    rules = [{"host": "*.test", "action": "tunnel"}]
    async with running_gateway(make_settings(tmp_path, rules=rules), open_tunnel=opener) as gw:
        for host, expect in (("ssrf.test", "403 ssrf.test resolves to 10.1.1.1 (private)"),
                             ("slow.test", "504 cannot open a tunnel to slow.test:443: connect "
                                           "timed out after 10s"),
                             ("down.test", "502 cannot open a tunnel to down.test:443: circuit "
                                           "open for 30s")):
            raw = await raw_request(gw.port, f"CONNECT {host}:443 HTTP/1.1\r\nHost: x\r\n\r\n"
                                    .encode())
            assert status_line(raw) == f"HTTP/1.1 {expect}"


async def test_tunnel_relays_raw_bytes_with_half_close(tmp_path):
    received = []

    async def echo(reader, writer):
        data = await reader.read()                # until the client half-closes
        received.append(len(data))
        writer.write(data[::-1])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rules = [{"host": "localhost", "action": "tunnel", "ports": [port]}]
    try:
        async with running_gateway(make_settings(tmp_path, rules=rules)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 Connection established")
            payload = bytes(range(256)) * 4096      # 1 MiB
            writer.write(payload)
            writer.write_eof()
            async with asyncio.timeout(10):
                back = await reader.read()
            assert back == payload[::-1]
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert received == [len(payload)]
