"""The prefetch scheduler on an injected clock and sleep: intervals with jitter, the first round
spread over the jitter window, ``trigger()`` checking everything at once. No time passes: the
injected sleep advances the injected clock. The checks run for real against a policy that
intercepts nothing, so they end as ``denied`` without any network traffic."""
from __future__ import annotations

import asyncio

import yaml

from gateway.cache import BlobStore, EntryStore
from gateway.lifecycle.freshness import Freshness
from gateway.lifecycle.prefetch import Prefetcher
from gateway.observability.metrics import Metrics
from gateway.policy import Policy
from gateway.settings import load_settings


def make(tmp_path, rand_values, park_after: int = 12):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({
        "policy": {"rules": [{"host": "*", "action": "tunnel"}]},
        "lifecycle": {"prefetch": {"jitter": 0.1, "artifacts": {
            "vulnerability_db": {"interval": "1h"}, "java_db": {"interval": "3h"},
            "checks_bundle": {"enabled": False}, "vex_hub": {"enabled": False}}}}}))
    s = load_settings(str(cfg), env={})
    metrics = Metrics()
    blobs = BlobStore(tmp_path / "cache", s.cache.max_size, 0, metrics)
    blobs.open()
    entries = EntryStore(tmp_path / "cache", blobs, s.cache.memory, metrics)
    entries.open()
    now = [1_000_000.0]
    waits: list[float] = []
    checks: list[tuple[float, str]] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds
        if len(waits) > park_after:
            now[0] -= seconds
            await asyncio.Event().wait()  # park (no time passes); trigger() or stop() ends it

    rand = iter(rand_values)
    p = Prefetcher(s.lifecycle.prefetch, s.cache, None, Policy(s.policy), entries, blobs,
                   metrics, Freshness(tmp_path / "state.json", metrics, clock=lambda: now[0]),
                   clock=lambda: now[0], sleep=fake_sleep, rand=lambda: next(rand))
    real_check = p.check

    async def recording_check(name: str) -> str:
        checks.append((now[0], name))
        return await real_check(name)
    p.check = recording_check
    return p, now, waits, checks


async def _run_until_parked(p: Prefetcher, waits: list) -> None:
    p.start()
    for _ in range(1000):
        if len(waits) > 12:
            break
        await asyncio.sleep(0)
    await p.stop()


def test_intervals_with_jitter_on_an_injected_clock(tmp_path):
    # first round: db at 0.5 * 10 % of 1 h, java at 1.0 * 10 % of 3 h; then waits at the
    # extremes of the jitter window (rand 0 → -10 %, rand 1 → +10 %)
    p, now, waits, checks = make(tmp_path, [0.5, 1.0] + [0.0, 1.0] * 20)
    start = now[0]
    asyncio.run(_run_until_parked(p, waits))
    db = [t - start for t, n in checks if n == "vulnerability_db"]
    java = [t - start for t, n in checks if n == "java_db"]
    assert db[0] == 180 and java[0] == 1080
    gaps = [b - a for a, b in zip(db, db[1:])]
    assert gaps and all(3240 <= g <= 3960 for g in gaps), gaps
    assert {round(g) for g in gaps + [b - a for a, b in zip(java, java[1:])]} & {3240, 3960}
    java_gaps = [b - a for a, b in zip(java, java[1:])]
    assert all(9720 <= g <= 11880 for g in java_gaps), java_gaps
    state = p.freshness.artifacts["vulnerability_db"]
    assert state.last_result == "denied" and "not intercepted" in state.last_error


def test_trigger_checks_every_artifact_at_once(tmp_path):
    p, now, waits, checks = make(tmp_path, [0.5] * 100, park_after=2)

    async def go():
        p.start()
        for _ in range(100):  # first round done, parked in the long wait
            if len(checks) >= 2:
                break
            await asyncio.sleep(0)
        before = len(checks)
        at = now[0]
        p.trigger()
        for _ in range(100):
            if len(checks) >= before + 2:
                break
            await asyncio.sleep(0)
        await p.stop()
        return before, at

    before, at = asyncio.run(go())
    assert before == 2
    assert sorted(n for t, n in checks[before:before + 2]) == ["java_db", "vulnerability_db"]
    assert all(t == at for t, _ in checks[before:before + 2])
