"""GitHub's primary rate limit (403/429 + X-RateLimit-Remaining: 0 + X-RateLimit-Reset) opens the
host's circuit until the reset; proved by what the local TLS server receives."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from gateway.upstream import UpstreamError
from gateway.upstream.retry_after import rate_limit_reset_in
from upstream_support import GET, pki, sample, upstream  # noqa: F401

HOST = "api.gh.test"
RATE_LIMITED_BODY = json.dumps({
    "message": "API rate limit exceeded for 127.0.0.1.",
    "documentation_url": "https://docs.github.com/rest/overview/resources-in-the-rest-api"})


def limited_handler(status: int = 403, reset_in: float = 5, remaining: str = "0",
                    retry_after: str | None = None):
    async def handler(request, srv):
        if srv.state.get("ok"):
            return web.json_response([{"name": "README.md"}],
                                     headers={"X-RateLimit-Remaining": "59"})
        headers = {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": remaining,
                   "X-RateLimit-Reset": str(int(time.time() + reset_in)),
                   "X-RateLimit-Resource": "core"}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return web.Response(status=status, text=RATE_LIMITED_BODY, headers=headers,
                            content_type="application/json")
    return handler


CONTENTS = f"https://{HOST}/repos/aquasecurity/vexhub/contents/"


def test_rate_limit_reset_in_parsing():
    now = 1_000_000.0
    assert rate_limit_reset_in({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1000005"},
                               now) == pytest.approx(5)
    assert rate_limit_reset_in({"X-RateLimit-Remaining": " 0 ", "X-RateLimit-Reset": "1000005.5"},
                               now) == pytest.approx(5.5)
    for headers in ({"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "1000005"},
                    {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "999999"},    # past
                    {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1000000"},   # now
                    {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "soon"},
                    {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "nan"},
                    {"X-RateLimit-Remaining": "0"},
                    {"X-RateLimit-Reset": "1000005"},
                    {}):
        assert rate_limit_reset_in(headers, now) is None, headers


async def test_403_remaining_0_opens_circuit_until_reset_and_nothing_more_is_sent(pki):
    async with upstream(pki, {HOST: limited_handler(403, reset_in=5)}) as (client, metrics, srv):
        t0 = time.monotonic()
        resp = await client.request(GET(CONTENTS))
        # returned at once, not retried (attempts=4 in the test settings)
        assert resp.status == 403 and time.monotonic() - t0 < 1
        assert resp.headers["X-RateLimit-Remaining"] == "0"
        assert b"API rate limit exceeded" in await resp.read()
        assert srv.count == 1
        remaining = client.circuit_remaining(HOST)
        assert remaining is not None and 3.5 < remaining <= 5.0   # Reset is whole epoch seconds
        for i in range(10):
            with pytest.raises(UpstreamError) as ei:
                await client.request(GET(CONTENTS + f"f{i}.json"))
            err = ei.value
            assert err.reason == "circuit_open" and err.status == 429
            assert err.retry_after == pytest.approx(5, abs=1.5)
            assert HOST in err.message and "rate limit exhausted" in err.message
        assert srv.count == 1                                      # the server log proves it
        h = client.health()[HOST]
        assert h["state"] == "open" and h["last_status"] == 403 and h["opened_count"] == 1
        assert h["retries"] == 0
        assert sample(metrics, "trivy_gateway_upstream_circuit_state", host=HOST) == 2
        assert sample(metrics, "trivy_gateway_upstream_retry_after_seconds_count", host=HOST) == 1
        assert 3.5 < sample(metrics, "trivy_gateway_upstream_retry_after_seconds_sum",
                            host=HOST) <= 5.0
        assert client.circuit_remaining("other.test") is None


async def test_429_remaining_0_with_retry_after_uses_retry_after(pki):
    handler = limited_handler(429, reset_in=3000, retry_after="120")
    async with upstream(pki, {HOST: handler}) as (client, metrics, srv):
        resp = await client.request(GET(CONTENTS))
        assert resp.status == 429
        await resp.release()
        assert srv.count == 1
        assert client.circuit_remaining(HOST) == pytest.approx(120, abs=2)
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET(CONTENTS))
        assert ei.value.reason == "circuit_open" and ei.value.status == 429
        assert ei.value.retry_after == pytest.approx(120, abs=2)
        assert srv.count == 1
        assert sample(metrics, "trivy_gateway_upstream_retry_after_seconds_sum", host=HOST) == 120


async def test_reset_window_capped_by_max_open_for_then_probe_closes(pki):
    async with upstream(pki, {HOST: limited_handler(403, reset_in=3600)},
                        circuit=dict(max_open_for=0.5)) as (client, _, srv):
        resp = await client.request(GET(CONTENTS))
        assert resp.status == 403
        await resp.release()
        assert client.circuit_remaining(HOST) == pytest.approx(0.5, abs=0.1)
        with pytest.raises(UpstreamError) as ei:
            await client.request(GET(CONTENTS))
        assert ei.value.reason == "circuit_open" and ei.value.status == 429
        assert srv.count == 1
        await asyncio.sleep(0.6)
        srv.state["ok"] = True
        resp = await client.request(GET(CONTENTS))               # the half-open probe
        assert resp.status == 200
        await resp.read()
        assert client.health()[HOST]["state"] == "closed" and srv.count == 2


@pytest.mark.parametrize("case", ["remaining_left", "reset_past", "no_reset"])
async def test_403_without_exhausted_future_limit_is_returned_as_before(pki, case):
    if case == "remaining_left":
        handler = limited_handler(403, reset_in=5, remaining="3")
    elif case == "reset_past":
        handler = limited_handler(403, reset_in=-10)
    else:
        async def handler(request, srv):
            return web.Response(status=403, text="forbidden",
                                headers={"X-RateLimit-Remaining": "0"})
    async with upstream(pki, {HOST: handler}) as (client, metrics, srv):
        for _ in range(3):
            resp = await client.request(GET(CONTENTS))
            assert resp.status == 403
            await resp.release()
        assert srv.count == 3                                      # no retry, no circuit
        assert client.circuit_remaining(HOST) is None
        assert client.health()[HOST]["state"] == "closed"
        assert sample(metrics, "trivy_gateway_upstream_retry_after_seconds_count", host=HOST) == 0


@pytest.mark.parametrize("status", [429, 403])
async def test_secondary_rate_limit_with_short_retry_after_is_retried(pki, status):
    """GitHub answers secondary rate limits with 429 or 403 + Retry-After while budget is
    left (X-RateLimit-Remaining > 0): a short one is waited out and retried, both alike."""
    async def handler(request, srv):
        if srv.count <= 2:
            return web.Response(status=status, text='{"message": "You have exceeded a secondary '
                                'rate limit."}', content_type="application/json",
                                headers={"Retry-After": "0.1", "X-RateLimit-Remaining": "41",
                                         "X-RateLimit-Reset": str(int(time.time() + 600))})
        return web.json_response([])

    async with upstream(pki, {HOST: handler}) as (client, metrics, srv):
        resp = await client.request(GET(CONTENTS))
        assert resp.status == 200
        await resp.read()
        assert srv.count == 3
        assert client.circuit_remaining(HOST) is None
        assert sample(metrics, "trivy_gateway_upstream_retries_total", host=HOST,
                      reason="status_429") == 2


async def test_secondary_rate_limit_403_with_long_retry_after_opens_circuit(pki):
    async def handler(request, srv):
        return web.Response(status=403, text="secondary rate limit", headers={
            "Retry-After": "120", "X-RateLimit-Remaining": "41"})

    async with upstream(pki, {HOST: handler}) as (client, metrics, srv):
        resp = await client.request(GET(CONTENTS))
        assert resp.status == 403                # returned (the cache may serve stale)
        await resp.read()
        remaining = client.circuit_remaining(HOST)
        assert remaining is not None and 100 < remaining <= 120
        with pytest.raises(UpstreamError) as info:
            await client.request(GET(CONTENTS))
        assert info.value.reason == "circuit_open"
        assert srv.count == 1                    # nothing more reached the server


async def test_plain_403_is_not_retried(pki):
    async def handler(request, srv):
        return web.Response(status=403, text="forbidden",
                            headers={"X-RateLimit-Remaining": "41"})

    async with upstream(pki, {HOST: handler}) as (client, metrics, srv):
        resp = await client.request(GET(CONTENTS))
        assert resp.status == 403
        await resp.read()
        assert srv.count == 1
        assert client.circuit_remaining(HOST) is None
