"""Upstream client against small TLS servers on loopback: retries, Retry-After, overrides, TLS."""
from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from gateway.upstream import UpstreamError, UpstreamRequest
from upstream_support import (GET, FakeServer, dead_port, other_pki, pki, sample,  # noqa: F401
                              upstream)


async def test_plain_get_through_override_with_other_port_keeps_host_and_sni(pki):
    async def handler(request, srv):
        return web.Response(body=b"hello", headers={"X-Host": request.headers["Host"]})

    async with upstream(pki, {"reg.test": handler}) as (client, metrics, srv):
        assert srv.port != 443
        resp = await client.request(GET("https://reg.test/v2/x?a=b%3Ac",
                                         headers={"User-Agent": "trivy/0.76.0",
                                                  "Accept-Encoding": "gzip"}))
        assert resp.status == 200
        assert await resp.read() == b"hello"
        seen = srv.log[0]
        assert seen.host == "reg.test"               # Host kept (no port: URL has none)
        assert srv.sni == ["reg.test"]               # SNI = original host
        assert seen.path_qs == "/v2/x?a=b%3Ac"       # query passed verbatim
        assert seen.headers["User-Agent"] == "trivy/0.76.0"
        assert seen.headers["Accept-Encoding"] == "gzip"
        assert "Accept" not in seen.headers
        # without a client User-Agent the gateway names itself; it never adds Accept-Encoding
        resp = await client.request(GET("https://reg.test/plain"))
        await resp.read()
        assert srv.log[1].headers["User-Agent"] == "trivy-gateway/0.1"
        assert "Accept-Encoding" not in srv.log[1].headers
        assert sample(metrics, "trivy_gateway_upstream_responses_total",
                      host="reg.test", status="200") == 2


async def test_burst_of_429_with_small_retry_after_is_absorbed(pki):
    async def handler(request, srv):
        srv.state["n"] = srv.state.get("n", 0) + 1
        if srv.state["n"] <= 3:
            return web.Response(status=429, text="slow down", headers={"Retry-After": "0"})
        return web.Response(body=b"manifest")

    async with upstream(pki, {"reg.test": handler},
                        retry=dict(retry_after_min=0.1)) as (client, metrics, srv):
        t0 = time.monotonic()
        resp = await client.request(GET("https://reg.test/v2/r/manifests/2"))
        body = await resp.read()
        elapsed = time.monotonic() - t0
        assert (resp.status, body) == (200, b"manifest")
        assert srv.count == 4
        assert elapsed >= 3 * 0.1                      # each Retry-After floored to 0.1 s
        assert sample(metrics, "trivy_gateway_upstream_retries_total", host="reg.test",
                      reason="status_429") == 3
        assert sample(metrics, "trivy_gateway_upstream_retry_after_seconds_count",
                      host="reg.test") == 3
        # AIMD: the rate was cut on 429
        assert client.health()["reg.test"]["rate"] < 1000
        assert client.health()["reg.test"]["state"] == "closed"


async def test_ghcr_microsecond_retry_after_does_not_hot_loop(pki):
    ghcr_body = ('{"errors":[{"code":"TOOMANYREQUESTS","message":"retry-after: 35.852µs, '
                 'allowed: 44000/minute"}]}')

    async def handler(request, srv):
        return web.Response(status=429, text=ghcr_body, content_type="application/json")

    async with upstream(pki, {"ghcr.test": handler},
                        retry=dict(attempts=3, retry_after_min=0.25)) as (client, metrics, srv):
        t0 = time.monotonic()
        resp = await client.request(GET("https://ghcr.test/v2/aquasecurity/trivy-db/manifests/2"))
        elapsed = time.monotonic() - t0
        # retries exhausted on a status: the last answer is returned, body intact
        assert resp.status == 429
        assert (await resp.read()).decode() == ghcr_body
        assert srv.count == 3                          # bounded attempts, not a hot loop
        assert elapsed >= 2 * 0.25                     # 35.852µs floored to retry_after_min
        gaps = [b.t - a.t for a, b in zip(srv.log, srv.log[1:])]
        assert min(gaps) >= 0.24
        # the value as sent (microseconds) is what the histogram saw
        assert sample(metrics, "trivy_gateway_upstream_retry_after_seconds_sum",
                      host="ghcr.test") == pytest.approx(3 * 35.852e-6, rel=1e-3)


async def test_503_then_success_and_connection_errors_are_retried(pki):
    async def handler(request, srv):
        srv.state["n"] = srv.state.get("n", 0) + 1
        if srv.state["n"] == 1:
            return web.Response(status=503, text="busy")
        if srv.state["n"] == 2:
            request.transport.close()                  # reset before any response
            await asyncio.sleep(0.05)
            return web.Response(status=500)
        return web.Response(text="ok")

    async with upstream(pki, {"mvn.test": handler}) as (client, metrics, srv):
        resp = await client.request(GET("https://mvn.test/maven2/a.pom"))
        assert resp.status == 200 and await resp.read() == b"ok"
        assert srv.count == 3
        assert sample(metrics, "trivy_gateway_upstream_retries_total", host="mvn.test",
                      reason="status_5xx") == 1
        # the reset is retried too (by aiohttp itself on a reused keep-alive connection, or
        # by the client's own loop on a fresh one): either way the caller sees one answer


async def test_connection_refused_raises_connect_after_attempts(pki):
    async with upstream(pki, {}, overrides={"down.test": f"127.0.0.1:{dead_port()}"},
                        retry=dict(attempts=3)) as (client, metrics, _):
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET("https://down.test/x"))
        assert ei.value.reason == "connect" and ei.value.status == 502
        assert sample(metrics, "trivy_gateway_upstream_responses_total", host="down.test",
                      status="error") == 3


async def test_untrusted_certificate_fails_tls_without_retry(pki, other_pki):
    async def handler(request, srv):
        return web.Response(text="should never be reached")

    async with upstream(pki, {"evil.test": FakeServer(other_pki, ["evil.test"], handler)}
                        ) as (client, _, srv):
        t0 = time.monotonic()
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET("https://evil.test/"))
        assert ei.value.reason == "tls" and ei.value.status == 502
        assert "certificate" in ei.value.message.lower()
        assert srv.count == 0
        assert len(srv.sni) == 1                       # one handshake, no retries
        assert time.monotonic() - t0 < 2


async def test_wrong_hostname_fails_tls(pki):
    async def handler(request, srv):
        return web.Response(text="x")

    async with upstream(pki, {"reg.test": FakeServer(pki, ["someone-else.test"], handler)}
                        ) as (client, _, srv):
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET("https://reg.test/"))
        assert ei.value.reason == "tls"
        assert srv.count == 0


async def test_stalled_upstream_hits_the_deadline(pki):
    async def handler(request, srv):
        await asyncio.sleep(30)                        # never answers in time
        return web.Response(text="late")

    async with upstream(pki, {"slow.test": handler},
                        retry=dict(deadline=1.0),
                        read_timeout=20) as (client, _, srv):
        t0 = time.monotonic()
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET("https://slow.test/blob"))
        elapsed = time.monotonic() - t0
        assert ei.value.reason == "deadline" and ei.value.status == 504
        assert "slow.test" in str(ei.value) and "deadline" in ei.value.message
        assert 0.9 <= elapsed < 1.6
        # an explicit absolute deadline wins over the configured one
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET("https://slow.test/blob", deadline=loop.time() + 0.3))
        assert ei.value.reason == "deadline"
        assert time.monotonic() - t0 < 0.8


async def test_read_timeout_is_retried_then_deadline(pki):
    async def handler(request, srv):
        srv.state["n"] = srv.state.get("n", 0) + 1
        if srv.state["n"] == 1:
            await asyncio.sleep(5)                      # first try stalls past read_timeout
        return web.Response(text="fine")

    async with upstream(pki, {"slow.test": handler}, read_timeout=0.3) as (client, metrics, srv):
        resp = await client.request(GET("https://slow.test/x"))
        assert resp.status == 200 and await resp.read() == b"fine"
        assert srv.count == 2
        assert sample(metrics, "trivy_gateway_upstream_retries_total", host="slow.test",
                      reason="timeout") == 1


async def test_post_is_not_retried(pki):
    async def handler(request, srv):
        await request.read()
        return web.Response(status=503, text="busy")

    async with upstream(pki, {"api.test": handler}) as (client, _, srv):
        async def body():
            yield b"payload"
        resp = await client.request(UpstreamRequest("POST", "https://api.test/x", body=body()))
        assert resp.status == 503
        await resp.release()
        assert srv.count == 1
