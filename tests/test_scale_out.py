"""Replicas acting as one cache (docs/scale-out.md): several gateway subprocesses, one real
``redis-server``, one real SeaweedFS S3 gateway (``weed mini``), the emulated upstream world.
Upstream request counts come from the emulated servers' own access log."""
from __future__ import annotations

import asyncio
import hashlib
import time

import aiohttp
import pytest

from tests.emulated.world import MAVEN, MIRROR
from tests.gateway_harness import free_port
from tests.scale_support import RedisServer, SeaweedS3
from tests.test_gateway_cache import blob_path, get, sha

POM = "/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom"
S3_KEY, S3_SECRET = "gateway-test-key", "gateway-test-secret-0123456789"


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """weed mini with credentials required; the gateways get them the AWS SDK way (env)."""
    server = SeaweedS3(tmp_path / "s3", S3_KEY, S3_SECRET).start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    yield server
    server.stop()


def shared_config(redis: RedisServer, s3: SeaweedS3 | None = None, peer: bool = True,
                  lease_ttl: str = "3s") -> dict:
    shared: dict = {"redis_url": redis.url, "lease_ttl": lease_ttl}
    if peer:
        shared["peer_listen"] = f"127.0.0.1:{free_port()}"
    if s3 is not None:
        shared["s3"] = {"endpoint": s3.endpoint, "bucket": "trivy-gateway-test",
                        "part_size": "5MiB"}
    return {"cache": {"shared": shared}}


def replicas(make_gateway, world, n: int, redis, s3=None, extra=None, **kw):
    out = []
    for i in range(n):
        cfg = shared_config(redis, s3, **kw)
        if extra:
            cfg = {**cfg, **extra}
        out.append(make_gateway(world, cfg, name=f"replica{i}-"))
    return out


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Bounded poll (messages between processes arrive within milliseconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- 1. shared state: circuits, budget, leases -----------------------------------------------
async def test_maven_429_retry_after_1800_on_one_replica_opens_the_circuit_on_all(
        clean_upstreams, make_gateway, redis_server):
    world = clean_upstreams
    a, b, c = replicas(make_gateway, world, 3, redis_server)
    world.too_many_requests(MAVEN, path="/maven2/", times=None, retry_after=1800)
    status, headers, _ = await get(a, f"https://{MAVEN}{POM}")
    assert status == 429
    assert len(world.requests(host=MAVEN)) == 1
    for gw in (b, c):
        wait_for(lambda gw=gw: gw.status()["upstreams"].get(MAVEN, {}).get("circuit") == "open",
                 what="the circuit to open on the other replicas")
        view = gw.status()["upstreams"][MAVEN]
        assert view["open_remaining"] > 1700  # the window of the 1800 s Retry-After, not a local one
        assert "seen by replica" in (view.get("why") or "")
        status, headers, _ = await get(gw, f"https://{MAVEN}{POM}")
        assert status == 429 and int(headers["Retry-After"]) > 1700
        assert gw.metric("trivy_gateway_fleet_circuit_events_total", direction="received") == 1
    assert len(world.requests(host=MAVEN)) == 1  # the other replicas sent nothing
    assert a.metric("trivy_gateway_fleet_circuit_events_total", direction="sent") == 1
    # a replica started later learns the open circuit from Redis
    d = make_gateway(world, shared_config(redis_server), name="late-")
    wait_for(lambda: d.status()["upstreams"].get(MAVEN, {}).get("circuit") == "open",
             what="the late replica to load the open circuit")


async def test_the_upstream_budget_is_shared_by_the_replicas(
        clean_upstreams, make_gateway, redis_server):
    """rate 0.5/s with a burst of 2 for Maven, for the fleet: 2 replicas × 2 requests at once →
    two go at once, the other two wait for tokens (≥ ~2 s), not 4 at once as two local budgets
    would allow."""
    world = clean_upstreams
    limits = {"upstream": {"limits": {MAVEN: {"rate": 0.5, "burst": 2, "queue_timeout": "20s"}},
                           "retry": {"deadline": "30s"}}}
    a, b = replicas(make_gateway, world, 2, redis_server, extra=limits)
    paths = [POM, POM.replace("demo-lib", "demo-parent").replace("1.2.3", "1.0.0"),
             "/maven2/org/example/demo/none/1/none-1.pom", "/maven2/org/example/demo/none/2/none-2.pom"]
    await asyncio.gather(*(get(gw, f"https://{MAVEN}{p}")
                           for gw, p in zip((a, a, b, b), paths)))
    starts = sorted(e.t_start for e in world.requests(host=MAVEN))
    assert len(starts) == 4
    # the third and fourth requests of the fleet waited for tokens (0.5/s): ≥ 2 s and ≥ 4 s
    # after the first, whichever replica sent them (token accrual, not a timed race)
    assert starts[2] - starts[0] >= 1.5 and starts[3] - starts[0] >= 3.5, starts
    waited = sum(gw.metric("trivy_gateway_fleet_budget_wait_seconds_count") for gw in (a, b))
    assert waited == 4


async def test_without_shared_settings_nothing_changes(clean_upstreams, make_gateway):
    """The embedded default: no fleet in the status, no shared gauges, fills as before."""
    world = clean_upstreams
    gw = make_gateway(world)
    assert gw.status()["fleet"] is None
    assert "trivy_gateway_shared_backend_up{" not in gw.metrics_text()
    status, _, body = await get(gw, f"https://{MIRROR}{blob_path(world, 'checks')}")
    assert status == 200 and sha(body) == world.digest("checks", "layer")
