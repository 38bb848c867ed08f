"""Issue 10 (upstream part): a client's broken upload never blames the upstream (D1), no
credentials in cleartext (D4), uploads never hold fetch slots (D7), ``Expect: 100-continue`` is
not passed on (D12), wildcard hosts do not grow state without bound (D9).

The client-side cases run both against the upstream client alone and through the real gateway
(subprocess, raw sockets through CONNECT + the intercepting TLS) against the emulated world.
"""
from __future__ import annotations

import asyncio
import json
import socket
import ssl

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict

from gateway.exchange import ClientBodyError
from gateway.settings import CredentialSettings
from gateway.upstream import UpstreamError, UpstreamRequest
from gateway.upstream.types import Reason
from tests.emulated.world import GHCR, REPOSITORIES
from upstream_support import GET, FakeServer, dead_port, pki, upstream  # noqa: F401

HOST = "reg.test"
REPRS = ("ConnectionKey", "SSLContext object", "Connection<", " at 0x")


def readable(text: str | None) -> bool:
    return text is not None and not any(r in text for r in REPRS)


async def echo(request, srv):
    data = await request.read()
    srv.state.setdefault("bodies", []).append(data)
    return web.Response(body=b"ok")


def POST(url: str, body, **headers) -> UpstreamRequest:
    return UpstreamRequest("POST", url, headers=CIMultiDict(headers), body=body)


# --------------------------------------------------------------------------------------------
# D1 a client's broken upload is not an upstream failure
# --------------------------------------------------------------------------------------------
async def broken_upload(after: bytes):
    yield after
    raise ClientBodyError("request body: invalid chunk size")


async def test_client_body_errors_never_open_the_circuit_nor_reach_health(pki):
    async with upstream(pki, {HOST: echo}, circuit=dict(failure_threshold=3)) as (client, _, _):
        for i in range(6):
            with pytest.raises(UpstreamError) as ei:
                await client.request(POST(f"https://{HOST}/upload/{i}", broken_upload(b"x" * i)))
            err = ei.value
            assert err.reason == Reason.CLIENT_BODY and err.status == 400, err.message
            assert readable(err.message), err.message
        h = client.health()[HOST]
        assert h["state"] == "closed" and h["consecutive_failures"] == 0, h
        assert h["errors"] == 0 and h["last_error"] is None, h
        resp = await client.request(GET(f"https://{HOST}/v2/"))
        assert resp.status == 200 and await resp.read() == b"ok"


async def test_a_client_stalling_its_upload_past_the_deadline_does_not_blame_the_host(pki):
    async def stall():
        yield b"x"
        await asyncio.Event().wait()                 # the client never sends the rest

    async with upstream(pki, {HOST: echo}, retry=dict(deadline=1),
                        circuit=dict(failure_threshold=1)) as (client, _, _):
        with pytest.raises(UpstreamError) as ei:
            await client.request(POST(f"https://{HOST}/upload", stall()))
        assert ei.value.reason == Reason.DEADLINE
        h = client.health()[HOST]
        assert (h["state"], h["errors"], h["failed_requests"]) == ("closed", 0, 0), h


async def test_connection_failure_messages_are_readable(pki):
    async with upstream(pki, {}, overrides={HOST: f"127.0.0.1:{dead_port()}"},
                        retry=dict(attempts=1)) as (client, _, _):
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET(f"https://{HOST}/v2/"))
        assert ei.value.reason == Reason.CONNECT
        assert readable(ei.value.message) and "Connection refused" in ei.value.message, \
            ei.value.message
        assert readable(client.health()[HOST]["last_error"])


async def _through_gateway(gw, raw_request: bytes, host: str = GHCR) -> bytes:
    """Send ``raw_request`` inside an intercepted TLS connection; the answer (or b"")."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
    try:
        writer.write(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        await writer.drain()
        assert b" 200 " in await reader.readuntil(b"\r\n\r\n")
        ctx = ssl.create_default_context(cafile=str(gw.ca_pem))
        await writer.start_tls(ctx, server_hostname=host)
        writer.write(raw_request)
        await writer.drain()
        if raw_request.endswith(b"\r\n\r\n") or b"chunked" in raw_request:
            async with asyncio.timeout(30):
                return await reader.read(65536)
        return b""
    finally:
        writer.close()


BAD_CHUNKED = (b"POST /x HTTP/1.1\r\nHost: ghcr.io\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"zz\r\nhello\r\n0\r\n\r\n")
SHORT_BODY = (b"POST /x HTTP/1.1\r\nHost: ghcr.io\r\nContent-Length: 1000000\r\n\r\n"
              + b"a" * 1000)


@pytest.mark.parametrize("raw", [BAD_CHUNKED, SHORT_BODY], ids=["bad-chunk-framing", "hang-up"])
async def test_broken_uploads_through_the_gateway_leave_the_circuit_closed(
        clean_upstreams, make_gateway, raw):
    world = clean_upstreams
    gw = make_gateway(world, {"upstream": {"circuit": {"failure_threshold": 5,
                                                       "open_for": "60s"}}})
    for _ in range(6):
        answer = await _through_gateway(gw, raw)
        assert b"ConnectionKey" not in answer
    ghcr_repo = REPOSITORIES["db"][1]
    status = gw.status()["upstreams"].get(GHCR, {})
    assert status.get("circuit", "closed") == "closed", status
    assert status.get("last_error") is None or readable(status["last_error"]), status
    answer = await _through_gateway(
        gw, f"GET /v2/{ghcr_repo}/manifests/2 HTTP/1.1\r\nHost: ghcr.io\r\n"
            "Accept: application/vnd.oci.image.manifest.v1+json\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


# --------------------------------------------------------------------------------------------
# D4 credentials never in cleartext
# --------------------------------------------------------------------------------------------
async def test_no_authorization_over_plain_http(pki):
    async def record(request, srv):
        return web.Response(body=b"plain")

    cred = CredentialSettings(host="api.test", type="bearer", secret="s3cret-token")
    async with upstream(pki, {"api.test": FakeServer(None, ["api.test"], record)},
                        credentials=(cred,)) as (client, _, plain):
        for headers in ({}, {"Authorization": "Basic Y2xpZW50OnB3"}):
            resp = await client.request(GET("http://api.test/repos/x", headers=headers))
            assert resp.status == 200 and await resp.read() == b"plain"
        assert [s.headers.get("Authorization") for s in plain.log] == [None, None]


async def test_https_to_http_redirect_is_refused_and_nothing_reaches_plain_http(pki):
    async def redirect(request, srv):
        raise web.HTTPTemporaryRedirect("http://cdn.test/blob")

    async def record(request, srv):
        return web.Response(body=b"blob")

    cred = CredentialSettings(host=HOST, type="bearer", secret="s3cret-token")
    async with upstream(pki, {HOST: redirect, "cdn.test": FakeServer(None, ["cdn.test"], record)},
                        credentials=(cred,)) as rig:
        client, (tls, plain) = rig.client, rig.servers.values()
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET(f"https://{HOST}/v2/r/blobs/sha256:1", follow_redirects=True,
                                     headers={"Authorization": "Bearer client"}))
        assert ei.value.reason == Reason.INSECURE_REDIRECT, ei.value.message
        assert "http://cdn.test/blob" in ei.value.message
        assert tls.log[0].headers["Authorization"] == "Bearer client"
        assert plain.count == 0
        assert client.health()[HOST]["state"] == "closed"


# --------------------------------------------------------------------------------------------
# D7 uploads do not hold fetch slots
# --------------------------------------------------------------------------------------------
async def test_slow_uploads_do_not_starve_fetches(pki):
    release = asyncio.Event()
    started = asyncio.Semaphore(0)

    async def trickle():
        yield b"x"
        started.release()
        await release.wait()
        yield b"y"

    limits = {"default": dict(max_concurrency=8, queue_timeout=2),
              HOST: dict(max_concurrency=8, queue_timeout=2)}
    async with upstream(pki, {HOST: echo}, limits=limits) as (client, _, srv):
        uploads = [asyncio.create_task(client.request(POST(f"https://{HOST}/up/{i}", trickle())))
                   for i in range(8)]
        try:
            async with asyncio.timeout(10):
                for _ in range(8):
                    await started.acquire()             # all 8 are mid-upload
            resp = await client.request(GET(f"https://{HOST}/v2/"))
            assert resp.status == 200 and await resp.read() == b"ok"
            assert client.health()[HOST]["in_flight"] == 0
            release.set()
            for resp in await asyncio.gather(*uploads):
                assert resp.status == 200
                await resp.read()
            assert sorted(srv.state["bodies"]) == [b""] + [b"xy"] * 8    # the GET, the uploads
        finally:
            release.set()
            for t in uploads:
                t.cancel()
            await asyncio.gather(*uploads, return_exceptions=True)


# --------------------------------------------------------------------------------------------
# D12 Expect: 100-continue is the proxy's business, not the upstream's
# --------------------------------------------------------------------------------------------
async def test_expect_100_continue_is_not_forwarded(pki):
    """The upstream never sends 100 and waits for the body (as many servers do)."""
    heads: list[bytes] = []

    async def serve(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            await reader.readuntil(b"0\r\n\r\n")          # the chunked body's end
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0,
                                        ssl=pki.server_context([HOST]))
    port = server.sockets[0].getsockname()[1]
    async def body():
        yield b"payload"

    try:
        async with upstream(pki, {}, overrides={HOST: f"127.0.0.1:{port}"},
                            retry=dict(deadline=5)) as (client, _, _):
            resp = await client.request(POST(f"https://{HOST}/upload", body(),
                                             Expect="100-continue"))
            assert resp.status == 201 and await resp.read() == b"ok"
            assert b"expect" not in heads[0].lower()
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------------------------
# D9 wildcard hosts: bounded per-host state, folded into "other"
# --------------------------------------------------------------------------------------------
class LoopbackDNS(AbstractResolver):
    """DNS pinned to loopback: every name resolves to the test server (like /etc/hosts)."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{"hostname": host, "host": "127.0.0.1", "port": self.port,
                 "family": socket.AF_INET, "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


async def test_two_thousand_wildcard_hosts_keep_state_bounded(pki):
    from gateway.upstream.hosts import MAX_TRACKED_HOSTS, OTHER

    async def ok(request, srv):
        return web.Response(body=b"ok", headers={"Connection": "close"})

    srv = await FakeServer(None, ["wild.test"], ok).start()
    async with upstream(None, {HOST: srv},
                        client_kw=dict(dns=LoopbackDNS(srv.port))) as (client, _, _):
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                resp = await client.request(GET(f"http://h{i}.wild.test/x"))
                assert resp.status == 200
                await resp.read()

        await asyncio.gather(*(one(i) for i in range(2000)))
        assert len(client.hosts) <= MAX_TRACKED_HOSTS + 1
        health = client.health()
        assert set(health) == {OTHER}
        assert len(json.dumps(health)) < 2048             # was ~1.2 MB for 2,000 names
        print(f"FIGURES hosts_tracked={len(client.hosts)} status_bytes={len(json.dumps(health))}")
        other = health[OTHER]
        assert other["hosts"] <= MAX_TRACKED_HOSTS and other["state"] == "closed"
        assert other["requests"] == other["hosts"]    # one request per remembered host
        # a configured host keeps its own entry and is never forgotten
        resp = await client.request(GET(f"http://{HOST}/x"))
        await resp.read()
        for i in range(2000, 2000 + MAX_TRACKED_HOSTS + 10):
            client.hosts.state(f"h{i}.wild.test")
        assert HOST in client.health() and len(client.hosts) <= MAX_TRACKED_HOSTS + 1


# --------------------------------------------------------------------------------------------
# issue 14 point 4: permanent errors fail fast; an outage is logged once, and its end
# --------------------------------------------------------------------------------------------
class NoSuchName(AbstractResolver):
    """DNS that knows no name (as on a machine without network: NXDOMAIN)."""

    def __init__(self) -> None:
        self.lookups: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        pass


async def test_unknown_name_is_not_retried(pki):
    dns = NoSuchName()
    async with upstream(pki, {}, known=["gone.test"], retry=dict(attempts=4),
                        client_kw=dict(dns=dns)) as (client, _, _):
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET("https://gone.test/v2/"))
        assert ei.value.reason == Reason.DNS and ei.value.status == 502
        assert "Name or service not known" in ei.value.message and readable(ei.value.message)
        assert dns.lookups == ["gone.test"]              # one lookup: no retry
        h = client.health()["gone.test"]
        assert (h["errors"], h["failed_requests"], h["retries"]) == (1, 1, 0)


async def test_outage_is_logged_once_with_counts_that_match_status(pki):
    from structlog.testing import capture_logs

    async def handler(request, srv):
        if srv.state.get("up"):
            return web.Response(body=b"ok")
        return web.Response(status=503, text="down")

    async with upstream(pki, {HOST: handler}, retry=dict(attempts=2),
                        circuit=dict(failure_threshold=3, open_for=0.3)) as (client, _, srv):
        with capture_logs() as logs:
            for _ in range(3):                          # 3 requests × 2 attempts each
                resp = await client.request(GET(f"https://{HOST}/x"))
                assert resp.status == 503
                await resp.release()
            with pytest.raises(UpstreamError) as ei:
                await client.request(GET(f"https://{HOST}/x"))
            h = client.health()[HOST]
            assert (h["failed_requests"], h["responses"]) == (3, 6)
            assert "3 consecutive failed requests" in ei.value.message
            await asyncio.sleep(0.35)                   # the open window (0.3 s) passes
            resp = await client.request(GET(f"https://{HOST}/x"))   # the probe fails: reopen
            await resp.release()
            await asyncio.sleep(0.35)
            srv.state["up"] = True
            resp = await client.request(GET(f"https://{HOST}/x"))   # the probe succeeds
            assert resp.status == 200 and await resp.read() == b"ok"
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert [e["event"] for e in warnings] == ["upstream_outage", "upstream_recovered"], logs
        outage, recovered = warnings
        assert (outage["failed_requests"], outage["errors"]) == (3, 0)   # 503s, no errors
        assert recovered["probes_failed"] == 1


async def test_a_failed_request_is_one_info_line_however_many_attempts(pki):
    from structlog.testing import capture_logs

    async with upstream(pki, {}, overrides={HOST: f"127.0.0.1:{dead_port()}"},
                        retry=dict(attempts=4)) as (client, _, _):
        with capture_logs() as logs:
            with pytest.raises(UpstreamError):
                await client.request(GET(f"https://{HOST}/v2/"))
        assert client.health()[HOST]["errors"] == 4
        info = [e for e in logs if e["log_level"] != "debug"]
        assert [e["event"] for e in info] == ["upstream_error"], logs
        assert info[0]["attempts"] == 4
