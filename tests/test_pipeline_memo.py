"""The hit path's memos never answer with a stale decision: the classification memo
(``Pipeline._classify``) and the rendered answer of an entry (``serve._plain_answer``) follow a
configuration reload (through the gateway's own reload step), a purge, a new generation of the
entry, the clock (``Age``, ``ttl=``), and every request field that changes the answer.

Real parts as in test_pipeline_freshness.py (stores on disk, the upstream client over real TLS
to the emulated world); only the clock the pipeline reads is moved by the test."""
from __future__ import annotations

from multidict import CIMultiDict

from gateway.app import Gateway
from gateway.exchange import Exchange
from gateway.observability.metrics import Metrics
from gateway.settings import load_settings
from tests.emulated.world import CHECK, MIRROR
from tests.gateway_harness import deep_merge
from tests.test_pipeline_freshness import (  # noqa: F401 - the world and make fixtures are shared
    MANIFEST_ACCEPT, TAG, Harness, make, world)

MAVEN = "repo.maven.apache.org"
POM = "/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom"
INDEX_ACCEPT = "application/vnd.oci.image.index.v1+json"


def reload(h: Harness, extra: dict) -> None:
    """Apply a new configuration the way SIGHUP does (``Gateway._apply``: settings and
    ``cache`` swapped on the running pipeline, the policy's hosts made known to the metrics)."""
    gw = Gateway(h.settings)
    gw.pipeline, gw.upstream, gw.metrics = h.pipeline, h.upstream, h.pipeline.metrics
    base = {"server": {"data_dir": str(h.settings.data_dir)},
            "upstream": {"ca_bundle": str(h.settings.upstream.ca_bundle),
                         "address_overrides": dict(h.settings.upstream.address_overrides)},
            "cache": {"min_free_space": 0}}
    gw._apply(load_settings(env={}, overrides=deep_merge(base, extra)))  # noqa: SLF001


def ask(h: Harness, host: str, target: str, **headers: str):
    ex = Exchange("GET", "https", host, 443, target, CIMultiDict(headers))
    return ex, h.pipeline.try_hit(ex)


async def test_reload_with_another_tag_ttl_is_followed(world, make):
    h = await make({"cache": {"oci": {"tag_ttl": {"aquasec/trivy-db": "60s"}}}})
    assert (await h.get(MIRROR, TAG, Accept=MANIFEST_ACCEPT))[3] == "miss"
    assert (await h.get(MIRROR, TAG, Accept=MANIFEST_ACCEPT))[3] == "hit"   # classified: memo
    reload(h, {"cache": {"oci": {"tag_ttl": {"aquasec/trivy-db": "5s"}}}})
    h.clock.advance(61)                                  # expired: revalidated under the new TTL
    assert (await h.get(MIRROR, TAG, Accept=MANIFEST_ACCEPT))[3] in ("revalidated", "miss")
    h.clock.advance(6)               # fresh for 60 s under the old TTL, expired under the new one
    assert ask(h, MIRROR, TAG, Accept=MANIFEST_ACCEPT)[1] is None
    assert (await h.get(MIRROR, TAG, Accept=MANIFEST_ACCEPT))[3] in ("revalidated", "miss")


async def test_reload_that_turns_caching_off_is_followed(world, make):
    h = await make()
    assert (await h.get(MAVEN, POM))[3] == "miss"
    ex, quick = ask(h, MAVEN, POM)
    assert quick is not None and ex.notes["kind"] == "maven"
    reload(h, {"cache": {"enabled": False}})
    ex, quick = ask(h, MAVEN, POM)
    assert quick is None and ex.notes["kind"] == "passthrough"
    status, _, body, result = await h.get(MAVEN, POM)
    assert (status, result) == (200, "bypass") and body.startswith(b"<?xml")


async def test_one_differing_request_field_is_its_own_decision(world, make):
    h = await make()
    # Accept selects another tag manifest key (an index is never served for a manifest)
    assert (await h.get(MIRROR, TAG, Accept=MANIFEST_ACCEPT))[3] == "miss"
    assert ask(h, MIRROR, TAG, Accept=MANIFEST_ACCEPT)[1] is not None
    assert ask(h, MIRROR, TAG, Accept=INDEX_ACCEPT)[1] is None
    assert (await h.get(MIRROR, TAG, Accept=INDEX_ACCEPT))[3] == "miss"
    # Authorization: a request with credentials is never answered from the shared entry
    assert (await h.get(MAVEN, POM))[3] == "miss"
    assert (await h.get(MAVEN, POM))[3] == "hit"
    ex, quick = ask(h, MAVEN, POM, Authorization="Bearer s3cret")
    assert quick is None
    assert (await h.get(MAVEN, POM, Authorization="Bearer s3cret"))[3] == "bypass"
    assert (await h.get(MAVEN, POM))[3] == "hit"
    # validators: the same request with If-None-Match is a 304, not the memoised 200
    _, headers, _, _ = await h.get(MAVEN, POM)
    status, _, body, result = await h.get(MAVEN, POM, **{"If-None-Match": headers["ETag"]})
    assert (status, body, result) == (304, b"", "hit")
    status, got, body, _ = await h.get(MAVEN, POM, Range="bytes=0-4")
    assert (status, body, got["Content-Range"].startswith("bytes 0-4/")) == (206, b"<?xml", True)


async def test_age_and_ttl_follow_the_clock_on_one_entry(world, make):
    h = await make({"policy": {"rules": [{"host": CHECK, "action": "intercept"}]}})
    world.fail_status(CHECK, 200, path="^/a$", times=None, body=b"a", content_type="text/plain",
                      headers=[("Cache-Control", "max-age=30")])
    assert (await h.get(CHECK, "/a"))[3] == "miss"
    assert (await h.get(MAVEN, POM))[3] == "miss"        # immutable: the same Cache-Status
    seen = []
    for _ in range(3):
        answers = [ask(h, CHECK, "/a")[1], ask(h, MAVEN, POM)[1]]
        seen.append([(r.headers["Age"], r.headers["Cache-Status"], r.head) for r in answers])
        h.clock.advance(1)
    assert [[a[:2] for a in s] for s in seen] == [
        [("0", "trivy-gateway; hit; ttl=30"), ("0", "trivy-gateway; hit")],
        [("1", "trivy-gateway; hit; ttl=29"), ("1", "trivy-gateway; hit")],
        [("2", "trivy-gateway; hit; ttl=28"), ("2", "trivy-gateway; hit")]]
    for i, answers in enumerate(seen):
        for age, status, head in answers:
            assert b"Age: %d\r\n" % i in head and b"Cache-Status: %s\r\n" % status.encode() in head


async def test_purge_and_new_generation_are_served_with_their_own_fields(world, make):
    h = await make({"policy": {"rules": [{"host": CHECK, "action": "intercept"}]}})
    world.fail_status(CHECK, 200, path="^/g$", times=None, body=b"one", content_type="text/plain",
                      headers=[("Cache-Control", "max-age=30"), ("ETag", '"v1"')])
    assert (await h.get(CHECK, "/g"))[3] == "miss"
    _, quick = ask(h, CHECK, "/g")
    assert quick.body.data == b"one" and b'"v1"' in quick.head
    # an operator purge (another process), then the origin has new content
    await h.purge_as_operator()
    h.mono.advance(1.5)                                  # the purge check is due
    world.clear_faults(CHECK)
    world.fail_status(CHECK, 200, path="^/g$", times=None, body=b"two", content_type="text/plain",
                      headers=[("Cache-Control", "max-age=30"), ("ETag", '"v2"')])
    assert ask(h, CHECK, "/g")[1] is None
    assert (await h.get(CHECK, "/g"))[2:] == (b"two", "miss")
    _, quick = ask(h, CHECK, "/g")
    assert quick.body.data == b"two" and b'"v2"' in quick.head and b'"v1"' not in quick.head
    assert quick.headers["ETag"] == '"v2"'
    # expiry: the next generation (same key, new entry) replaces it, fields and all
    world.clear_faults(CHECK)
    world.fail_status(CHECK, 200, path="^/g$", times=None, body=b"three",
                      content_type="text/plain",
                      headers=[("Cache-Control", "max-age=30"), ("ETag", '"v3"')])
    h.clock.advance(31)
    assert (await h.get(CHECK, "/g"))[2] == b"three"
    _, quick = ask(h, CHECK, "/g")
    assert quick.body.data == b"three" and b'"v3"' in quick.head
    assert quick.headers["ETag"] == '"v3"' and quick.headers["Age"] == "0"


def hits(metrics: Metrics, host: str) -> float:
    labels = {"host": host, "kind": "generic", "result": "hit"}
    return metrics.registry.get_sample_value("trivy_gateway_cache_requests_total", labels) or 0


async def test_a_host_named_by_a_reload_is_counted_under_its_own_label(world, make):
    """The cache-request counter children are kept per host: once a reload names a host that
    was counted as ``other``, its requests are counted under its own label."""
    h = await make({"policy": {"rules": [{"host": CHECK, "action": "intercept"}]}})
    h.pipeline.metrics = fresh = Metrics()             # nothing named yet: CHECK is ``other``
    world.fail_status(CHECK, 200, path="^/a$", times=None, body=b"a", content_type="text/plain",
                      headers=[("Cache-Control", "max-age=30")])
    assert (await h.get(CHECK, "/a"))[3] == "miss"
    assert (await h.get(CHECK, "/a"))[3] == "hit"
    assert (hits(fresh, "other"), hits(fresh, CHECK)) == (1, 0)
    reload(h, {"policy": {"rules": [{"host": CHECK, "action": "intercept"}]}})
    assert (await h.get(CHECK, "/a"))[3] == "hit"
    assert ask(h, CHECK, "/a")[1] is not None
    assert (hits(fresh, "other"), hits(fresh, CHECK)) == (1, 2)


async def test_the_classification_memo_is_bounded(world, make):
    from gateway.pipeline.handler import CLASSIFIED_MAX

    h = await make()
    for i in range(CLASSIFIED_MAX + 10):                 # distinct requests: misses, no I/O
        ex, quick = ask(h, MAVEN, f"/maven2/org/example/x{i}/x/1.0/x-1.0.pom")
        assert quick is None and ex.notes["kind"] == "maven"
    assert 0 < len(h.pipeline._classified) <= CLASSIFIED_MAX  # noqa: SLF001
