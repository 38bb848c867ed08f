"""Prefetch traffic is counted apart from client traffic.

The prefetcher sends its requests through the same pipeline as clients; its misses (new
generations fetched before anyone asks) and revalidations used to land in the clients' cache
counters, so an idle gateway showed misses no client had and the hit ratio operators judge the
cache by was wrong. Real parts: the pipeline, blob and entry stores on disk, the upstream client
over real TLS to the emulated world, the real prefetcher; only the wall clock is injected.
"""
from __future__ import annotations

from multidict import CIMultiDict

from gateway.admin.page import render_status_page
from gateway.exchange import Exchange
from gateway.lifecycle.freshness import Freshness
from gateway.lifecycle.prefetch import TRIVY_MANIFEST_ACCEPT, CheckResult, Prefetcher
from gateway.observability.metrics import Metrics
from gateway.policy import Policy
from tests.emulated.world import MIRROR
from tests.test_pipeline_freshness import make, world  # noqa: F401 - fixtures

ONLY_DB_AND_VEX = {"lifecycle": {"prefetch": {"artifacts": {
    "java_db": {"enabled": False}, "checks_bundle": {"enabled": False}}}}}


def by_result(metrics: Metrics, name: str) -> dict[str, float]:
    """Sum of every sample of counter ``name`` per ``result`` (the registry's collection
    flushes the deferred per-request counts first)."""
    out: dict[str, float] = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name and s.value:
                out[s.labels["result"]] = out.get(s.labels["result"], 0) + s.value
    return out


async def client_get(h, target: str, **headers: str) -> str:
    ex = Exchange("GET", "https", MIRROR, 443, target, CIMultiDict(headers), client="127.0.0.1:1")
    resp = await h.pipeline.handle(ex)
    try:
        async for _ in resp.body.chunks():
            pass
    finally:
        await resp.body.close()
    assert resp.status == 200, (target, resp.status)
    return ex.notes["cache"]


async def test_prefetch_requests_are_not_client_cache_requests(world, make, tmp_path):
    h = await make(ONLY_DB_AND_VEX)
    s = h.settings
    prefetcher = Prefetcher(s.lifecycle.prefetch, s.cache, h.pipeline.handle, Policy(s.policy),
                            h.entries, h.blobs, h.metrics,
                            Freshness(tmp_path / "prefetch.json", h.metrics, clock=h.clock),
                            clock=h.clock)
    prefetcher.freshness.load({n: a.reference for n, a in prefetcher.watched.items()})

    # an idle gateway: only the prefetcher asks
    assert await prefetcher.check("vulnerability_db") == CheckResult.FETCHED
    assert await prefetcher.check("vex_hub") == CheckResult.FETCHED
    assert by_result(h.metrics, "trivy_gateway_cache_requests_total") == {}
    assert h.pipeline.results == {}
    prefetch = by_result(h.metrics, "trivy_gateway_prefetch_cache_requests_total")
    assert prefetch.get("miss", 0) >= 3, prefetch       # tag manifest, layer, VEX archive
    assert h.pipeline.prefetch_results == {k: int(v) for k, v in prefetch.items()}

    # a scanner then gets what the prefetcher cached: the clients' hit ratio is 100 %
    db = world.published["db"]
    assert await client_get(h, "/v2/aquasec/trivy-db/manifests/2",
                            accept=TRIVY_MANIFEST_ACCEPT) == "hit"
    assert await client_get(h, f"/v2/aquasec/trivy-db/blobs/{db.layer.digest}") == "hit"
    assert by_result(h.metrics, "trivy_gateway_cache_requests_total") == {"hit": 2}
    assert h.pipeline.results == {"hit": 2}

    # the next check revalidates the tag: prefetch activity, still not the clients'
    assert await prefetcher.check("vulnerability_db") == CheckResult.UNCHANGED
    assert by_result(h.metrics, "trivy_gateway_cache_requests_total") == {"hit": 2}
    later = by_result(h.metrics, "trivy_gateway_prefetch_cache_requests_total")
    assert sum(later.values()) > sum(prefetch.values()), (prefetch, later)


def test_status_page_hit_ratio_card_names_client_and_prefetch_counts_apart():
    page = render_status_page({"hit_ratio": 1.0, "cache_results": {"hit": 2},
                               "prefetch_cache_results": {"miss": 3, "revalidated": 1}})
    card = page[page.index('id="hit-ratio"'):page.index("Served from cache")]
    assert "100" in card and "clients: hit 2" in card
    assert 'id="prefetch-results">prefetch, not counted: miss 3 · revalidated 1' in card
    idle = render_status_page({"hit_ratio": None, "cache_results": {},
                               "prefetch_cache_results": {"miss": 3}})
    assert "no client requests yet" in idle and "prefetch, not counted: miss 3" in idle
    assert 'id="prefetch-results"' not in render_status_page({"cache_results": {"hit": 1}})
