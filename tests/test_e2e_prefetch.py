"""Prefetch end to end: the real gateway watches the emulated registries' tags and fetches a new
generation before any client asks; the real Trivy 0.76 then gets it from the cache with no
upstream blob request, also with the registries down. A corrupt layer is never published; a
host the allowlist does not intercept is never prefetched.

The check interval is set to 1 s (``lifecycle.prefetch.artifacts.vulnerability_db.interval``) instead of waiting hours;
every wait below is a bounded poll of ``/api/status`` for the state the test needs.
"""
from __future__ import annotations

import json
import time

import pytest

from tests.e2e_support import (CDN, CODELOAD, GHCR, MIRROR, TrivyClient, blob_requests, diag,
                               require_trivy)
from tests.emulated import write_config_project
from tests.emulated.services import vex_repository_manifest
from tests.test_e2e_trivy import assert_db_in, config_scan, db_only, ok, vex_download

pytestmark = pytest.mark.e2e

ONLY_DB = {"lifecycle": {"prefetch": {
    "enabled": True, "jitter": 0,
    "artifacts": {"vulnerability_db": {"interval": "1s"},
                  "java_db": {"enabled": False}, "checks_bundle": {"enabled": False},
                  "vex_hub": {"enabled": False}}}}}


def db_state(gw, artifact: str = "vulnerability_db") -> dict:
    return next(a for a in gw.status()["lifecycle"]["artifacts"] if a["artifact"] == artifact)


def wait_for(gw, pred, what: str, timeout: float = 60.0,
             artifact: str = "vulnerability_db") -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = db_state(gw, artifact)
        if pred(state):
            return state
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {state}\n" \
                                            + gw.log_tail(30)
        time.sleep(0.2)


def blob_file(gw, digest: str):
    hexd = digest.split(":", 1)[1]
    return gw.data_dir / "cache" / "blobs" / "sha256" / hexd[:2] / hexd


def test_new_db_generation_is_fetched_before_any_client_and_served_as_hits(
        clean_upstreams, make_gateway, tmp_path):
    require_trivy()
    world = clean_upstreams
    gw = make_gateway(world, ONLY_DB)
    first = world.published["db"]
    wait_for(gw, lambda s: s["served_digest"] == first.manifest_digest, "the first generation")

    world.clear_log()
    new = world.publish_db(revision=4242)
    state = wait_for(gw, lambda s: s["served_digest"] == new.manifest_digest,
                     "the new generation")
    assert state["behind_upstream"] is False and state["last_result"] in ("fetched", "unchanged")
    meta = json.loads(new.description)  # the DB's metadata.json, read from the cached layer
    assert (state["updated_at"], state["next_update"]) == (meta["UpdatedAt"], meta["NextUpdate"])
    assert [g["digest"] for g in state["generations"]][:2] == [new.manifest_digest,
                                                                first.manifest_digest]
    world.wait_idle(10)
    fetched = [e for e in blob_requests(world) if e.status == 200]
    assert [e.path.rsplit("/", 1)[-1] for e in fetched] == [new.layer.digest], diag(world, gw)
    assert blob_file(gw, new.layer.digest).stat().st_size == new.layer.size
    assert gw.metric("trivy_gateway_prefetch_checks_total", artifact="vulnerability_db",
                     result="fetched") >= 2
    assert gw.metric("trivy_gateway_artifact_upstream_newer", artifact="vulnerability_db") == 0

    # the next scanner: the new generation, no blob bytes from upstream
    world.clear_log()
    t = TrivyClient(gw, tmp_path / "scanner")
    try:
        cache = t.fresh_cache()
        ok(db_only(t, cache=cache), world, gw)
        assert_db_in(cache)
        world.wait_idle(10)
        assert blob_requests(world) == [] and world.requests(host=CDN) == [], diag(world, gw)
        served = [e for e in gw.request_events(MIRROR, expect=4)
                  if e.get("path", "").endswith(new.layer.digest)]
        assert [e.get("cache") for e in served] == ["hit"], served

        # the upstream goes down: the newest generation is still what Trivy gets
        world.refuse(MIRROR)
        world.refuse(GHCR)
        cache2 = t.fresh_cache()
        ok(db_only(t, cache=cache2), world, gw)
        assert (cache2 / "db" / "trivy.db").read_bytes() == (cache / "db" / "trivy.db").read_bytes()
        state = wait_for(gw, lambda s: s["consecutive_failures"] >= 1, "a failed check")
        assert state["served_digest"] == new.manifest_digest
        assert gw.metric("trivy_gateway_prefetch_consecutive_failures",
                         artifact="vulnerability_db") >= 1
    finally:
        t.close()


def test_corrupt_layer_is_never_published_and_is_fetched_once_it_is_sound(
        clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world, ONLY_DB)
    first = world.published["db"]
    wait_for(gw, lambda s: s["served_digest"] == first.manifest_digest, "the first generation")
    new = world.artifacts.trivy_db(revision=4343, size_mib=world.db_size_mib)
    faults = [world.corrupt_byte(host, 1000, path=new.layer.digest, times=None)
              for host in (MIRROR, CDN)]
    world.publish("db", new)
    state = wait_for(gw, lambda s: s["consecutive_failures"] >= 2 and
                     s["upstream_digest"] == new.manifest_digest, "failed checks")
    assert state["served_digest"] == first.manifest_digest and state["behind_upstream"]
    assert not blob_file(gw, new.layer.digest).exists()
    assert gw.metric("trivy_gateway_cache_digest_mismatches_total") >= 1
    assert gw.metric("trivy_gateway_artifact_upstream_newer", artifact="vulnerability_db") == 1
    for f in faults:
        world.faults.remove(f)
    wait_for(gw, lambda s: s["served_digest"] == new.manifest_digest, "the sound layer")
    assert blob_file(gw, new.layer.digest).stat().st_size == new.layer.size


def test_nothing_is_prefetched_from_a_host_the_allowlist_does_not_intercept(
        clean_upstreams, make_gateway):
    world = clean_upstreams
    rules = {"policy": {"rules": [{"host": MIRROR, "action": "tunnel"},
                                  {"host": GHCR, "action": "intercept"}]}}
    gw = make_gateway(world, {**ONLY_DB, **rules})
    state = wait_for(gw, lambda s: s["last_result"] == "denied", "a denied check")
    assert "mirror.gcr.io is not intercepted" in state["last_error"]
    assert gw.metric("trivy_gateway_prefetch_checks_total", artifact="vulnerability_db",
                     result="denied") >= 1
    world.wait_idle(5)
    assert world.requests() == [], diag(world, gw)


def test_generations_beyond_keep_are_evicted_oldest_first(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world, ONLY_DB)
    gens = [world.published["db"]]
    wait_for(gw, lambda s: s["served_digest"] == gens[0].manifest_digest, "generation 1")
    for revision in (4401, 4402):
        gens.append(world.publish_db(revision=revision))
        wait_for(gw, lambda s: s["served_digest"] == gens[-1].manifest_digest,
                 f"generation {len(gens)}")
    state = db_state(gw)
    assert [g["digest"] for g in state["generations"]] == [gens[2].manifest_digest,
                                                           gens[1].manifest_digest]
    assert not blob_file(gw, gens[0].layer.digest).exists()
    assert not blob_file(gw, gens[0].manifest_digest).exists()
    for kept in gens[1:]:
        assert blob_file(gw, kept.layer.digest).stat().st_size == kept.layer.size


def test_prefetch_respects_open_circuits_and_adds_nothing_to_a_rate_limit(
        clean_upstreams, make_gateway):
    """Both registries answer 429 with a long Retry-After: one request each opens their circuits
    (upstream.retry.retry_after_max is below it), and the checks that follow — one a second —
    send nothing more until the circuits close; the cached generation stays served."""
    world = clean_upstreams
    gw = make_gateway(world, ONLY_DB)
    first = world.published["db"]
    wait_for(gw, lambda s: s["served_digest"] == first.manifest_digest, "the first generation")
    world.clear_log()
    for host in (MIRROR, GHCR):
        world.too_many_requests(host, path="/manifests/", times=None, retry_after=600)
    state = wait_for(gw, lambda s: s["consecutive_failures"] >= 5, "five failed checks")
    assert state["served_digest"] == first.manifest_digest
    assert "upstream unavailable" in state["last_error"], state
    world.wait_idle(5)
    sent = world.requests(path_contains="/manifests/")
    assert sorted(e.host for e in sent) == [GHCR, MIRROR], diag(world, gw)
    assert gw.status()["upstreams"][MIRROR]["circuit"] == "open"


EVERYTHING = {"lifecycle": {"prefetch": {"enabled": True, "jitter": 0, "artifacts": {
    name: {"interval": "1s"} for name in ("vulnerability_db", "java_db", "checks_bundle",
                                          "vex_hub")}}}}


def test_every_default_artifact_is_prefetched_and_scanners_only_see_hits(
        clean_upstreams, make_gateway, tmp_path):
    require_trivy()
    world = clean_upstreams
    world.github.set_manifest(vex_repository_manifest())
    archive = world.github.archive
    gw = make_gateway(world, EVERYTHING)
    t = TrivyClient(gw, tmp_path / "scanner")
    try:
        for artifact, kind in (("vulnerability_db", "db"), ("java_db", "javadb"),
                               ("checks_bundle", "checks")):
            wait_for(gw, lambda s, d=world.published[kind].manifest_digest:
                     s["served_digest"] == d, artifact, artifact=artifact)
        first_vex = wait_for(gw, lambda s: s["served_digest"] is not None, "vex", artifact="vex_hub")
        world.publish_vex(7)
        wait_for(gw, lambda s: s["served_digest"] not in (None, first_vex["served_digest"]),
                 "the new VEX archive", artifact="vex_hub")

        world.clear_log()
        ok(db_only(t), world, gw)
        ok(t.run("image", "--download-java-db-only", "--timeout", "80s"), world, gw)
        proj = tmp_path / "cfg"
        write_config_project(proj)
        config_scan(t, world, gw, proj)
        ok(t.run("vex", "repo", "init", "--timeout", "30s"), world, gw)
        vex_download(t, world, gw, t.fresh_cache())
        world.wait_idle(10)
        assert blob_requests(world) == [] and world.requests(host=CDN) == [], diag(world, gw)
        assert world.requests(host=CODELOAD, method="GET", status=200) == [], diag(world, gw)
    finally:
        t.close()
        world.github.set_archive(archive)
