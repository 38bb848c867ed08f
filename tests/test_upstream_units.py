"""Pure pieces of the upstream layer: Retry-After parsing, breaker, limiter, failover groups."""
from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import pytest

from gateway.observability.metrics import Metrics
from gateway.settings import CircuitSettings, HostLimitSettings, load_settings
from gateway.upstream import (Failover, equivalents, parse_go_duration, parse_retry_after_body,
                              parse_retry_after_header)
from gateway.upstream.circuit import CircuitBreaker, CircuitOpen
from gateway.upstream.limiter import HostLimiter, LimiterFull, LimiterTimeout
from gateway.upstream.registry_auth import parse_challenge


@pytest.mark.parametrize("value,expected", [
    ("120", 120.0), (" 0 ", 0.0), ("1.5", 1.5), ("-3", None), ("", None), (None, None),
    ("soon", None), ("35.852µs", 35.852e-6), ("250ms", 0.25), ("1m30s", 90.0),
])
def test_retry_after_header(value, expected):
    got = parse_retry_after_header(value)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_retry_after_http_date():
    now = 1_800_000_000.0
    assert parse_retry_after_header(formatdate(now + 90, usegmt=True), now=now) == \
        pytest.approx(90)
    assert parse_retry_after_header(formatdate(now - 90, usegmt=True), now=now) == 0


@pytest.mark.parametrize("body,expected", [
    ("TOOMANYREQUESTS: retry-after: 35.852µs, allowed: 44000/minute", 35.852e-6),
    ('{"errors":[{"code":"TOOMANYREQUESTS","message":"retry-after: 35.852μs, '
     'allowed: 44000/minute"}]}', 35.852e-6),                          # Greek mu, too
    ("toomanyrequests: Retry-After: 2s", 2.0),
    ("retry-after: 1.5ms, allowed: 1/s", 0.0015),
    ("retry-after: 3", 3.0),
    ("rate limited", None),
])
def test_retry_after_body(body, expected):
    got = parse_retry_after_body(body.encode())
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_go_duration():
    assert parse_go_duration("2h0m0s") == 7200
    assert parse_go_duration("1.5h") == 5400
    assert parse_go_duration("abc") is None


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_breaker_threshold_half_open_and_windows():
    clock = FakeClock()
    br = CircuitBreaker("h", CircuitSettings(failure_threshold=2, open_for=10, max_open_for=100),
                        clock=clock)
    assert br.admit() is False
    br.failure(503, "status 503")
    br.success()                                        # resets the count
    br.failure(503, "x")
    br.failure(429, "y")
    assert br.state == "open" and br.remaining() == 10
    with pytest.raises(CircuitOpen) as ei:
        br.admit()
    assert ei.value.status == 429 and ei.value.remaining == 10
    clock.t += 10
    assert br.admit() is True                           # the probe
    with pytest.raises(CircuitOpen) as ei:
        br.admit()                                      # only one at a time
    assert ei.value.probing
    br.success()                                        # a non-probe success changes nothing
    assert br.state == "half_open"
    br.success(probe=True)
    assert br.state == "closed"
    # Retry-After window capped by max_open_for; a straggler's success does not close it
    assert br.open_for_retry_after(1800, 429) == 100
    br.success()
    assert br.state == "open" and br.remaining() == 100
    clock.t += 100
    assert br.admit() is True
    br.probe_abandoned()                                # e.g. queue timeout: someone else may
    assert br.admit() is True
    br.failure(503, "still down", probe=True)
    assert br.state == "open" and br.remaining() == 10


async def test_limiter_aimd_and_queue():
    clock = FakeClock()
    lim = HostLimiter("h", HostLimitSettings(rate=10, burst=2, max_concurrency=5, queue_size=1,
                                             queue_timeout=1, backoff_factor=0.5,
                                             recovery_per_second=1), clock=clock)
    assert await lim.acquire(1) == 0 and await lim.acquire(1) == 0
    lim.on_throttled()
    assert lim.rate == 5
    lim.on_throttled()
    assert lim.rate == 2.5
    clock.t += 2                                        # +1/s additive recovery
    assert lim.current_rate() == pytest.approx(4.5)
    clock.t += 100
    assert lim.current_rate() == 10                     # never above the configured rate
    for _ in range(3):
        lim.on_throttled()
    assert lim.rate == 1.25
    assert lim.min_rate == pytest.approx(1 / 60)


async def test_limiter_concurrency_fifo_and_timeouts():
    lim = HostLimiter("h", HostLimitSettings(rate=1000, burst=1000, max_concurrency=1,
                                             queue_size=2, queue_timeout=1))
    await lim.acquire(1)
    order = []

    async def waiter(i):
        await lim.acquire(1)
        order.append(i)
        await asyncio.sleep(0.01)
        lim.release()

    tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
    await asyncio.sleep(0.01)
    assert lim.queue_depth == 2
    with pytest.raises(LimiterFull):
        await lim.acquire(1)
    lim.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1] and lim.in_flight == 0
    await lim.acquire(1)
    t0 = time.monotonic()
    with pytest.raises(LimiterTimeout):
        await lim.acquire(0.1)
    assert 0.09 <= time.monotonic() - t0 < 0.5
    assert lim.queue_depth == 0
    # a cancelled waiter leaves the queue and does not leak a slot
    task = asyncio.create_task(lim.acquire(5))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    lim.release()
    assert lim.in_flight == 0 and lim.queue_depth == 0


def test_failover_groups_from_default_config():
    s = load_settings(env={})
    groups = s.upstream.failover_groups
    assert equivalents(groups, "mirror.gcr.io", "aquasec/trivy-db") == \
        [("ghcr.io", "aquasecurity/trivy-db")]
    assert equivalents(groups, "GHCR.io", "aquasecurity/trivy-java-db") == \
        [("mirror.gcr.io", "aquasec/trivy-java-db")]
    assert equivalents(groups, "docker.io", "aquasec/trivy-db") == []
    m = Metrics()
    f = Failover(groups + (("a.io/x", "b.io/y", "c.io/z"),), m)
    assert f.equivalents("b.io", "y") == [("a.io", "x"), ("c.io", "z")]
    f.record_failover("mirror.gcr.io", "ghcr.io")
    assert m.registry.get_sample_value("trivy_gateway_upstream_failovers_total",
                                       {"from_host": "mirror.gcr.io", "to_host": "ghcr.io"}) == 1


def test_challenge_parsing():
    scheme, params = parse_challenge(
        'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull"')
    assert scheme == "bearer"
    assert params == {"realm": "https://ghcr.io/token", "service": "ghcr.io",
                      "scope": "repository:user/image:pull"}
    assert parse_challenge('Basic realm="Registry"') == ("basic", {"realm": "Registry"})
