"""Circuit breaker and per-host smoothing, proved by what the servers receive."""
from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from gateway.upstream import UpstreamError
from upstream_support import GET, FakeServer, pki, sample, upstream  # noqa: F401


async def test_maven_429_retry_after_1800_opens_circuit_and_nothing_more_is_sent(pki):
    async def handler(request, srv):
        return web.Response(status=429, text="Too Many Requests", headers={"Retry-After": "1800"})

    async with upstream(pki, {"maven.test": handler},
                        retry=dict(retry_after_max=30)) as (client, metrics, srv):
        t0 = time.monotonic()
        resp = await client.request(GET("https://maven.test/maven2/a/1/a-1.pom"))
        # no sleeping for 1800 s inside a request: the 429 comes back at once
        assert resp.status == 429 and time.monotonic() - t0 < 1
        assert await resp.read() == b"Too Many Requests"
        assert srv.count == 1
        remaining = client.circuit_remaining("maven.test")
        assert remaining == pytest.approx(1800, abs=2)
        # 20 more requests (other POMs): none reaches the server
        for i in range(20):
            with pytest.raises(UpstreamError) as ei:
                await client.request(GET(f"https://maven.test/maven2/b/{i}/b-{i}.pom"))
            err = ei.value
            assert err.reason == "circuit_open" and err.status == 429
            assert err.retry_after == pytest.approx(1800, abs=2)
            assert "maven.test" in err.message and "Retry-After 1800" in err.message
            assert "until" in err.message
        assert srv.count == 1                           # the server log proves it
        h = client.health()["maven.test"]
        assert h["state"] == "open" and h["remaining_seconds"] > 1790
        assert h["last_status"] == 429
        assert sample(metrics, "trivy_gateway_upstream_circuit_state", host="maven.test") == 2
        assert sample(metrics, "trivy_gateway_upstream_retry_after_seconds_sum",
                      host="maven.test") == 1800
        # another host is unaffected
        assert client.circuit_remaining("other.test") is None


async def test_long_retry_after_window_capped_then_half_open_single_probe(pki):
    async def handler(request, srv):
        mode = srv.state.get("mode", "429")
        if mode == "429":
            return web.Response(status=429, headers={"Retry-After": "1800"})
        await asyncio.sleep(0.2)                        # a slow probe, so others pile up
        return web.Response(text="back")

    async with upstream(pki, {"maven.test": handler},
                        circuit=dict(max_open_for=0.5)) as (client, metrics, srv):
        resp = await client.request(GET("https://maven.test/a.pom"))
        assert resp.status == 429
        await resp.release()
        assert client.circuit_remaining("maven.test") == pytest.approx(0.5, abs=0.1)
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET("https://maven.test/b.pom"))
        assert ei.value.reason == "circuit_open"
        assert srv.count == 1
        await asyncio.sleep(0.6)
        srv.state["mode"] = "ok"
        # half-open: of five concurrent requests exactly one is sent (the probe)
        results = await asyncio.gather(*(client.request(GET(f"https://maven.test/c{i}.pom"))
                                         for i in range(5)), return_exceptions=True)
        ok = [r for r in results if not isinstance(r, Exception)]
        held = [r for r in results if isinstance(r, UpstreamError)]
        assert len(ok) == 1 and len(held) == 4
        assert all(e.reason == "circuit_open" for e in held)
        assert srv.count == 2
        await ok[0].release()
        # the probe succeeded: closed again, requests flow
        assert client.health()["maven.test"]["state"] == "closed"
        resp = await client.request(GET("https://maven.test/d.pom"))
        assert resp.status == 200
        await resp.release()
        assert sample(metrics, "trivy_gateway_upstream_circuit_state", host="maven.test") == 0


async def test_failed_probe_reopens_and_consecutive_failures_open(pki):
    async def handler(request, srv):
        return web.Response(status=500, text="boom")

    async with upstream(pki, {"flaky.test": handler},
                        circuit=dict(failure_threshold=3, open_for=0.3)) as (client, _, srv):
        for _ in range(3):                              # 500 is not retried; 3 failures
            resp = await client.request(GET("https://flaky.test/x"))
            assert resp.status == 500
            await resp.release()
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET("https://flaky.test/x"))
        assert ei.value.reason == "circuit_open" and ei.value.status == 503
        assert "3 consecutive failed requests" in ei.value.message
        assert srv.count == 3
        await asyncio.sleep(0.35)
        resp = await client.request(GET("https://flaky.test/x"))   # the probe
        assert resp.status == 500
        await resp.release()
        assert srv.count == 4
        assert client.health()["flaky.test"]["state"] == "open"     # probe failed: reopened
        with pytest.raises(UpstreamError):
            await client.request(GET("https://flaky.test/x"))
        assert srv.count == 4


async def test_100_concurrent_requests_capped_at_4(pki):
    async def handler(request, srv):
        await asyncio.sleep(0.02)
        return web.Response(body=b"x" * 1000)

    async with upstream(pki, {"maven.test": handler},
                        limits={"maven.test": dict(max_concurrency=4)}) as (client, metrics, srv):
        async def one(i):
            resp = await client.request(GET(f"https://maven.test/p/{i}.pom"))
            return await resp.read()

        t0 = time.monotonic()
        bodies = await asyncio.gather(*(one(i) for i in range(100)))
        elapsed = time.monotonic() - t0
        assert all(b == b"x" * 1000 for b in bodies)
        assert srv.count == 100
        assert srv.max_concurrent <= 4
        assert srv.max_concurrent == 4                  # and the cap was actually used
        assert len(srv.peers) <= 4                      # connections, too
        assert elapsed >= 100 / 4 * 0.02 * 0.9
        h = client.health()["maven.test"]
        assert h["in_flight"] == 0 and h["queue_depth"] == 0
        assert sample(metrics, "trivy_gateway_upstream_queue_wait_seconds_count",
                      host="maven.test") == 100
        assert sample(metrics, "trivy_gateway_upstream_active_requests", host="maven.test") == 0


async def test_queue_timeout_and_queue_full(pki):
    async def handler(request, srv):
        await asyncio.sleep(0.6)
        return web.Response(text="done")

    async with upstream(pki, {"one.test": handler},
                        limits={"one.test": dict(max_concurrency=1, queue_size=2, queue_timeout=0.2)}) as (client, _, srv):
        first = asyncio.create_task(client.request(GET("https://one.test/a")))
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(client.request(GET(f"https://one.test/w{i}")))
                   for i in range(2)]
        await asyncio.sleep(0.01)
        assert client.health()["one.test"]["queue_depth"] == 2
        t0 = time.monotonic()
        with pytest.raises(UpstreamError) as ei:        # queue (2) full: refused at once
            await client.request(GET("https://one.test/x"))
        assert ei.value.reason == "queue_full" and ei.value.status == 503
        assert time.monotonic() - t0 < 0.05
        for task in waiting:
            with pytest.raises(UpstreamError) as ei:
                await task
            assert ei.value.reason == "queue_timeout" and ei.value.status == 503
        resp = await first
        assert await resp.read() == b"done"
        assert srv.count == 1
        assert client.health()["one.test"]["queue_depth"] == 0


async def test_token_bucket_spaces_requests(pki):
    async def handler(request, srv):
        return web.Response(text="ok")

    async with upstream(pki, {"api.test": handler},
                        limits={"api.test": dict(rate=10, burst=2)}) as (client, _, srv):
        async def one(i):
            resp = await client.request(GET(f"https://api.test/{i}"))
            await resp.read()
        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(6)))
        elapsed = time.monotonic() - t0
        # 2 from the burst, then 4 more at 10/s → about 0.4 s
        assert 0.35 <= elapsed < 1.0
        times = [s.t for s in srv.log]
        assert times[-1] - times[1] >= 0.35


async def test_retry_after_beyond_max_opens_circuit_and_deadline_returns_last_status(pki):
    async def handler(request, srv):
        if request.path == "/busy":
            return web.Response(status=503, text="maintenance", headers={"Retry-After": "45"})
        return web.Response(status=503, text="later", headers={"Retry-After": "2"})

    served = FakeServer(pki, ["a.test", "b.test"], handler)
    async with upstream(pki, {"a.test": served, "b.test": served},
                        retry=dict(retry_after_max=30)) as (client, _, srv):
        resp = await client.request(GET("https://a.test/busy"))
        assert resp.status == 503 and await resp.read() == b"maintenance"
        assert client.circuit_remaining("a.test") == pytest.approx(45, abs=1)
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET("https://a.test/other"))
        assert ei.value.status == 503 and ei.value.reason == "circuit_open"
        # Retry-After 2 s does not fit in a 1 s deadline: the 503 itself is the answer, at once
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        resp = await client.request(GET("https://b.test/x", deadline=loop.time() + 1))
        assert resp.status == 503 and await resp.read() == b"later"
        assert time.monotonic() - t0 < 0.5
        assert srv.count == 2
