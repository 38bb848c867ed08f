"""End to end: the unmodified Trivy 0.76 binary → HTTPS_PROXY → the real gateway (subprocess) →
the emulated upstream world (tests/emulated). Every flow Trivy has (docs/trivy-traffic.md), cold
and warm, the fleet case (8 concurrent cold scanners), a gateway restart, the upstream world down,
and the failures Trivy cannot survive on its own.

Counts come from the world's own access log. "Warm" = a second Trivy with a fresh cache dir against
the same gateway. Trivy trusts only the gateway CA (SSL_CERT_FILE); the gateway reaches the world
through ``upstream.address_overrides`` + ``upstream.ca_bundle``. Trivy missing = failures, not skips.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.e2e_support import (
    API, CDN, CHECK, CODELOAD, GH, GHCR, MAVEN, MIRROR, RAW, TrivyClient, blob_requests, diag,
    require_trivy, scanner_pool, upstream_counts, wait_http_ok,
)
from tests.emulated import CUSTOM_CHECK_ID, write_config_project, write_maven_project
from tests.emulated.services import vex_repository_manifest
from tests.gateway_harness import free_port

pytestmark = pytest.mark.e2e

ALL_HOSTS = (MIRROR, GHCR, CDN, API, RAW, GH, CODELOAD, MAVEN, CHECK)
POMS = {
    "/maven2/org/example/demo/demo-parent/1.0.0/demo-parent-1.0.0.pom",
    "/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom",
    "/maven2/org/example/demo/demo-transitive/0.9.0/demo-transitive-0.9.0.pom",
}
# counts printed at the end of the run (pytest -s or the terminal summary below)
COUNTS: dict[str, dict] = {}


def record(flow: str, phase: str, world) -> dict[str, int]:
    world.wait_idle(10)
    c = upstream_counts(world)
    COUNTS.setdefault(flow, {})[phase] = c
    return c


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def world(clean_upstreams):
    require_trivy()
    clean_upstreams.github.set_manifest(vex_repository_manifest())
    yield clean_upstreams
    clean_upstreams.github.set_manifest(vex_repository_manifest())


@pytest.fixture
def scanners(tmp_path):
    """``scanners(gw, name)`` → a TrivyClient (own HOME); all closed (processes killed) after."""
    with scanner_pool(tmp_path) as factory:
        yield factory


def ok(res, world, gw) -> None:
    assert res.returncode == 0, diag(world, gw, res)


def zero_blob_requests(world, gw, what: str) -> None:
    world.wait_idle(10)
    assert blob_requests(world) == [] and world.requests(host=CDN) == [], \
        f"{what}: blob bytes fetched upstream again" + diag(world, gw)


# ------------------------------------------------------------------ flows
def db_only(t: TrivyClient, *extra: str, cache=None, timeout=90):
    return t.run("image", "--download-db-only", "--timeout", "80s", *extra, cache=cache, timeout=timeout)


def assert_db_in(cache: Path) -> None:
    meta = json.loads((cache / "db" / "metadata.json").read_text())
    assert meta["Version"] == 2 and (cache / "db" / "trivy.db").stat().st_size > 0


def test_vuln_db_default_repository_cold_then_warm(world, make_gateway, scanners):
    gw = make_gateway(world)
    t = scanners(gw)
    cache = t.fresh_cache()
    res = db_only(t, cache=cache)
    ok(res, world, gw)
    assert_db_in(cache)
    cold = record("db default", "cold", world)
    layer = world.published["db"].layer
    blobs = blob_requests(world)
    assert [(b.host, b.status) for b in blobs] == [(MIRROR, 200)], diag(world, gw)
    assert blobs[0].bytes_sent == layer.size and blobs[0].path.endswith(layer.digest)
    assert GHCR not in cold
    # the gateway's own token flow reuses the challenge of Trivy's /v2/ ping: one ping, one
    # token, one manifest, one blob — what Trivy alone sends
    pings = [e for e in world.requests(host=MIRROR) if e.path == "/v2/"]
    assert len(pings) == 1, diag(world, gw)
    assert len(world.requests(host=MIRROR)) == 4, diag(world, gw)

    world.clear_log()
    cache2 = t.fresh_cache()
    ok(db_only(t, cache=cache2), world, gw)
    assert_db_in(cache2)
    record("db default", "warm", world)
    zero_blob_requests(world, gw, "warm DB download")
    assert world.requests() == [], "warm OCI flow should not reach any upstream" + diag(world, gw)


def test_vuln_db_ghcr_repository_cold_then_warm(world, make_gateway, scanners):
    gw = make_gateway(world)
    t = scanners(gw)
    repo = ("--db-repository", "ghcr.io/aquasecurity/trivy-db:2")
    cache = t.fresh_cache()
    res = db_only(t, *repo, cache=cache)
    ok(res, world, gw)
    assert_db_in(cache)
    record("db ghcr", "cold", world)
    layer = world.published["db"].layer
    gblobs = world.requests(host=GHCR, path_contains="/blobs/")
    cdn = world.requests(host=CDN)
    assert [b.status for b in gblobs] == [307], diag(world, gw)
    assert [(c.status, c.bytes_sent) for c in cdn] == [(200, layer.size)], diag(world, gw)
    assert world.requests(host=MIRROR) == []

    world.clear_log()
    ok(db_only(t, *repo), world, gw)
    record("db ghcr", "warm", world)
    zero_blob_requests(world, gw, "warm ghcr DB download")
    assert world.requests() == [], "warm OCI flow should not reach any upstream" + diag(world, gw)


def test_java_db_cold_then_warm(world, make_gateway, scanners):
    gw = make_gateway(world)
    t = scanners(gw)
    cache = t.fresh_cache()
    ok(t.run("image", "--download-java-db-only", "--timeout", "80s", cache=cache), world, gw)
    assert (cache / "java-db" / "trivy-java.db").exists()
    record("java db", "cold", world)
    blobs = blob_requests(world)
    assert [(b.host, b.status) for b in blobs] == [(MIRROR, 200)], diag(world, gw)
    assert blobs[0].path.endswith(world.published["javadb"].layer.digest)

    world.clear_log()
    cache2 = t.fresh_cache()
    ok(t.run("image", "--download-java-db-only", "--timeout", "80s", cache=cache2), world, gw)
    assert (cache2 / "java-db" / "trivy-java.db").exists()
    record("java db", "warm", world)
    zero_blob_requests(world, gw, "warm Java DB download")
    assert world.requests() == [], "warm OCI flow should not reach any upstream" + diag(world, gw)


def config_scan(t: TrivyClient, world, gw, proj: Path, cache=None):
    res = t.run("config", "--format", "json", "--timeout", "80s", str(proj), cache=cache)
    ok(res, world, gw)
    assert "Falling back to embedded checks" not in res.stderr, diag(world, gw, res)
    ids = {m.get("ID") for r in json.loads(res.stdout).get("Results") or []
           for m in r.get("Misconfigurations") or []}
    assert CUSTOM_CHECK_ID in ids, f"downloaded bundle not used: {ids}" + diag(world, gw, res)
    return res


def test_checks_bundle_used_by_config_scan_cold_then_warm(world, make_gateway, scanners, tmp_path):
    gw = make_gateway(world)
    t = scanners(gw)
    proj = tmp_path / "cfg"
    write_config_project(proj)
    res = config_scan(t, world, gw, proj)
    cold = record("checks bundle", "cold", world)
    blobs = blob_requests(world)
    assert [(b.host, b.status) for b in blobs] == [(MIRROR, 200)], diag(world, gw)
    assert blobs[0].path.endswith(world.published["checks"].layer.digest)
    # the version check is denied by the default policy: nothing reaches check.trivy.dev
    assert CHECK not in cold
    del res

    world.clear_log()
    config_scan(t, world, gw, proj)
    record("checks bundle", "warm", world)
    zero_blob_requests(world, gw, "warm checks bundle")
    assert world.requests() == [], "warm OCI flow should not reach any upstream" + diag(world, gw)


def vex_download(t: TrivyClient, world, gw, cache: Path):
    res = t.run("vex", "repo", "download", "--timeout", "60s", cache=cache)
    ok(res, world, gw)
    vdir = cache / "vex" / "repositories" / "default"
    assert (vdir / "0.1" / "index.json").exists(), diag(world, gw, res)
    return res


def test_vex_repo_download_cold_conditional_and_warm(world, make_gateway, scanners):
    world.github.set_manifest(vex_repository_manifest("1s"))
    gw = make_gateway(world)
    t = scanners(gw)
    ok(t.run("vex", "repo", "init", "--timeout", "30s"), world, gw)
    assert world.requests() == []
    cache = t.fresh_cache()
    vex_download(t, world, gw, cache)
    cold = record("vex", "cold", world)
    assert [e.status for e in world.requests(host=CODELOAD, method="GET")] == [200], diag(world, gw)
    assert API in cold and RAW in cold and GH in cold

    # second download after update_interval: Trivy sends If-None-Match → 304 (from the gateway)
    time.sleep(1.2)
    world.clear_log()
    res = vex_download(t, world, gw, cache)
    record("vex", "conditional (304)", world)
    assert world.requests(host=CODELOAD, method="GET", status=200) == [], diag(world, gw, res)
    # Trivy's If-None-Match was answered 304 by the gateway itself
    answered = [(e.get("method"), e.get("status")) for e in gw.request_events(CODELOAD, expect=4)]
    assert answered[-2:] == [("HEAD", 304), ("GET", 304)], answered

    # a second machine (fresh HOME and cache) against the warm gateway
    world.clear_log()
    t2 = scanners(gw, "u")
    ok(t2.run("vex", "repo", "init", "--timeout", "30s"), world, gw)
    vex_download(t2, world, gw, t2.fresh_cache())
    record("vex", "warm", world)
    assert world.requests(host=CODELOAD, method="GET", status=200) == [], diag(world, gw)
    assert world.requests() == [], "warm VEX flow should not reach any upstream" + diag(world, gw)


def maven_scan(t: TrivyClient, world, gw, proj: Path, cache=None):
    res = t.run("fs", "--format", "cyclonedx", "--timeout", "80s", str(proj), cache=cache)
    ok(res, world, gw)
    names = {c["name"] for c in json.loads(res.stdout).get("components", [])}
    assert {"demo-lib", "demo-transitive"} <= names, f"{names}" + diag(world, gw, res)
    return res


def test_maven_cyclonedx_cold_then_warm(world, make_gateway, scanners, tmp_path):
    gw = make_gateway(world)
    t = scanners(gw)
    proj = tmp_path / "mvn"
    write_maven_project(proj)
    maven_scan(t, world, gw, proj)
    record("maven", "cold", world)
    got = world.requests(host=MAVEN)
    assert {e.path for e in got if e.status == 200} == POMS, diag(world, gw)
    assert len(got) == 3, diag(world, gw)

    world.clear_log()
    maven_scan(t, world, gw, proj)
    record("maven", "warm", world)
    assert world.requests() == [], "warm Maven scan should not reach any upstream" + diag(world, gw)


def test_server_mode_downloads_db_through_gateway(world, make_gateway, scanners, tmp_path):
    gw = make_gateway(world)
    t = scanners(gw, "srv")
    port = free_port()
    srv, _ = t.start("server", "--listen", f"127.0.0.1:{port}", "--token", "T0ken", "--timeout", "80s",
                     cache=tmp_path / "srv-cache")
    ready = wait_http_ok(f"http://127.0.0.1:{port}/healthz", srv, 90)
    assert ready, f"trivy server not ready (exit={srv.poll()})" + diag(world, gw)
    record("server mode", "server start", world)
    assert [(b.host, b.status) for b in blob_requests(world)] == [(MIRROR, 200)], diag(world, gw)
    assert (tmp_path / "srv-cache" / "db" / "trivy.db").exists()

    world.clear_log()
    c = scanners(gw, "cli")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "requirements.txt").write_text("flask==0.5\n")
    res = c.run("fs", "--server", f"http://127.0.0.1:{port}", "--token", "T0ken", "--scanners", "vuln",
                "--format", "json", "--timeout", "60s", str(proj))
    ok(res, world, gw)
    report = json.loads(res.stdout)
    assert any(r.get("Target") == "requirements.txt" for r in report.get("Results") or []), report
    record("server mode", "client scan", world)
    assert blob_requests(world) == [], "the client must not download the DB" + diag(world, gw)
    bad = c.run("fs", "--server", f"http://127.0.0.1:{port}", "--token", "wrong", "--scanners", "vuln",
                "--timeout", "30s", str(proj))
    assert bad.returncode != 0


def test_allowlist_denied_host_shows_gateway_reason(world, make_gateway, scanners):
    gw = make_gateway(world)
    t = scanners(gw)
    res = db_only(t, "--db-repository", "registry.example.test/x/y:2", timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    # Go prints only the status line of a refused CONNECT: the reason phrase is the explanation
    assert "registry.example.test is not on the gateway allowlist (policy.rules)" in out, out[-3000:]
    record("allowlist", "denied", world)
    assert world.requests() == []


# ------------------------------------------------------------------ fleet, restart, outage
def test_eight_concurrent_cold_scanners_one_upstream_fetch_per_blob(world, make_gateway, scanners):
    gw = make_gateway(world)
    t = scanners(gw)
    started = [t.start("image", "--download-db-only", "--timeout", "100s") for _ in range(8)]
    results = [t.finish(p, args, 120) for p, args in started]
    for r in results:
        ok(r, world, gw)
        assert_db_in(Path(r.args[r.args.index("--cache-dir") + 1]))
    counts = record("8 concurrent cold", "cold x8", world)
    blobs = blob_requests(world)
    per_blob: dict[str, int] = {}
    for b in blobs:
        per_blob[b.path.rsplit("/", 1)[-1]] = per_blob.get(b.path.rsplit("/", 1)[-1], 0) + 1
    assert per_blob == {world.published["db"].layer.digest: 1}, f"{per_blob}" + diag(world, gw)
    assert len(world.requests(host=MIRROR, path_contains="/manifests/")) == 1, diag(world, gw)
    assert counts.get(CDN, 0) == 0


def test_concurrent_scanners_on_both_registries_share_one_fetch(world, make_gateway, scanners):
    """4 scanners on mirror.gcr.io and 4 on ghcr.io at once: the layer has the same digest on both
    (public artifact), so its bytes cross the upstream link once."""
    gw = make_gateway(world)
    t = scanners(gw)
    started = []
    for i in range(8):
        extra = ("--db-repository", "ghcr.io/aquasecurity/trivy-db:2") if i % 2 else ()
        started.append(t.start("image", "--download-db-only", "--timeout", "100s", *extra))
    results = [t.finish(p, args, 120) for p, args in started]
    for r in results:
        ok(r, world, gw)
    record("8 concurrent, mixed registries", "cold x8", world)
    layer = world.published["db"].layer
    full = [e for e in world.requests(status=200) if layer.digest in e.path and e.bytes_sent == layer.size]
    assert len(full) == 1, diag(world, gw)
    assert sum(e.bytes_sent for e in world.requests() if layer.digest in e.path) == layer.size, diag(world, gw)


def cold_all_flows(t, world, gw, tmp_path) -> None:
    ok(db_only(t), world, gw)
    ok(t.run("image", "--download-java-db-only", "--timeout", "80s"), world, gw)
    proj = tmp_path / "cfg"
    write_config_project(proj)
    config_scan(t, world, gw, proj)
    mvn = tmp_path / "mvn"
    write_maven_project(mvn)
    maven_scan(t, world, gw, mvn)
    ok(t.run("vex", "repo", "init", "--timeout", "30s"), world, gw)
    vex_download(t, world, gw, t.fresh_cache())


def warm_all_flows(t, world, gw, tmp_path) -> None:
    cache = t.fresh_cache("warm")
    ok(db_only(t, cache=cache), world, gw)
    assert_db_in(cache)
    ok(t.run("image", "--download-java-db-only", "--timeout", "80s", cache=cache), world, gw)
    config_scan(t, world, gw, tmp_path / "cfg", cache=cache)
    maven_scan(t, world, gw, tmp_path / "mvn", cache=cache)
    vex_download(t, world, gw, cache)


def test_restart_keeps_cache_warm(world, make_gateway, scanners, tmp_path):
    data_dir = tmp_path / "gw-data"
    gw = make_gateway(world, data_dir=data_dir)
    t = scanners(gw)
    cold_all_flows(t, world, gw, tmp_path)
    record("restart", "cold (all flows)", world)
    assert gw.stop() == 0, gw.log_tail()

    world.clear_log()
    gw2 = make_gateway(world, data_dir=data_dir)
    t2 = scanners(gw2, "after")
    ok(t2.run("vex", "repo", "init", "--timeout", "30s"), world, gw2)
    warm_all_flows(t2, world, gw2, tmp_path)
    record("restart", "warm after restart (all flows)", world)
    zero_blob_requests(world, gw2, "after a restart")
    assert world.requests() == [], "warm after restart should not reach any upstream" + diag(world, gw2)


SHORT_TTL = {"cache": {
    "oci": {"tag_ttl": {k: "1s" for k in (
        "aquasec/trivy-db", "aquasecurity/trivy-db", "aquasec/trivy-java-db", "aquasecurity/trivy-java-db",
        "aquasec/trivy-checks", "aquasecurity/trivy-checks", "default")}, "auth_ttl": "1s"},
    "github": {"ttl": "1s"},
    "maven": {"metadata_ttl": "1s", "snapshot_ttl": "1s"},
}}


def test_upstream_world_down_warm_scans_served_stale(world, make_gateway, scanners, tmp_path):
    gw = make_gateway(world, SHORT_TTL)
    t = scanners(gw)
    cold_all_flows(t, world, gw, tmp_path)
    record("world down", "cold (all flows)", world)
    time.sleep(1.5)  # every mutable entry (tags, tokens, GitHub) is expired now
    for host in ALL_HOSTS:
        world.refuse(host)
    world.clear_log()
    t2 = scanners(gw, "down")
    ok(t2.run("vex", "repo", "init", "--timeout", "30s"), world, gw)
    warm_all_flows(t2, world, gw, tmp_path)
    record("world down", "warm, every upstream refusing", world)
    assert world.requests() == []
    assert gw.metric("trivy_gateway_cache_requests_total", result="stale") >= 1


# ------------------------------------------------------------------ faults Trivy cannot survive alone
def test_blob_cut_midway_is_resumed(world, make_gateway, scanners):
    gw = make_gateway(world)
    t = scanners(gw)
    world.cut_after(MIRROR, 1024 * 1024, path=r"/trivy-db/blobs/", times=1)
    res = db_only(t)
    ok(res, world, gw)
    record("fault: blob cut", "cold", world)
    blobs = world.requests(host=MIRROR, path_contains="/blobs/")
    assert len(blobs) >= 2 and blobs[0].note.startswith("cut@"), diag(world, gw)
    assert blobs[1].header("range") == "bytes=1048576-" and blobs[1].status == 206, diag(world, gw)
    total = sum(b.bytes_sent for b in blobs)
    assert total == world.published["db"].layer.size, diag(world, gw)


def test_default_mirror_refusing_db_download_succeeds(world, make_gateway, scanners):
    """mirror.gcr.io refuses connections: alone, Trivy exits 1 at once (no fallback on network
    errors). Through the gateway the DB download succeeds, the layer coming from ghcr.io's CDN."""
    gw = make_gateway(world)
    t = scanners(gw)
    world.refuse(MIRROR)
    cache = t.fresh_cache()
    t0 = time.monotonic()
    res = db_only(t, cache=cache)
    took = time.monotonic() - t0
    ok(res, world, gw)
    assert_db_in(cache)
    c = record("fault: mirror refuses (DB)", "cold", world)
    COUNTS["fault: mirror refuses (DB)"]["cold"] = dict(
        c, seconds=round(took, 1), gateway_failovers=int(gw.metric("trivy_gateway_upstream_failovers_total")))
    assert len(world.requests(host=CDN, status=200)) == 1, diag(world, gw)
    assert world.requests(host=MIRROR) == []


def test_default_mirror_refusing_checks_bundle_fails_over_to_ghcr(world, make_gateway, scanners, tmp_path):
    """Trivy 0.76 has no ghcr.io fallback for the checks bundle: only the gateway's failover
    (upstream.failover_groups lists trivy-checks) can get GATEWAY-0001 to it."""
    gw = make_gateway(world)
    t = scanners(gw)
    world.refuse(MIRROR)
    proj = tmp_path / "cfg"
    write_config_project(proj)
    config_scan(t, world, gw, proj)
    record("fault: mirror refuses (checks)", "cold", world)
    assert [b.status for b in world.requests(host=GHCR, path_contains="/trivy-checks/blobs/")] == [307]
    assert gw.metric("trivy_gateway_upstream_failovers_total") >= 1


def test_expired_signed_url_is_refetched(world, make_gateway, scanners):
    gw = make_gateway(world)
    t = scanners(gw)
    world.expire_signed_urls(1)
    cache = t.fresh_cache()
    res = db_only(t, "--db-repository", "ghcr.io/aquasecurity/trivy-db:2", cache=cache)
    ok(res, world, gw)
    assert_db_in(cache)
    record("fault: expired signed URL", "cold", world)
    cdn = world.requests(host=CDN)
    assert [c.status for c in cdn] == [403, 200], diag(world, gw)
    # a fresh signed URL was asked for: the blob GET on ghcr.io was repeated
    assert [b.status for b in world.requests(host=GHCR, path_contains="/blobs/")] == [307, 307], diag(world, gw)
    assert world.requests(host=MIRROR, path_contains="/blobs/") == []


def test_maven_429_for_held_pom_served_from_cache(world, make_gateway, scanners, tmp_path):
    gw = make_gateway(world)
    t = scanners(gw)
    proj = tmp_path / "mvn"
    write_maven_project(proj)
    maven_scan(t, world, gw, proj)
    world.too_many_requests(MAVEN, times=None, retry_after=60, style="plain")
    world.clear_log()
    maven_scan(scanners(gw, "b"), world, gw, proj)
    record("fault: Maven 429", "warm", world)
    assert world.requests(host=MAVEN, status=200) == []


def test_github_rate_limit_served_from_cache(world, make_gateway, scanners):
    """A second scanner after GitHub's unauthenticated budget is gone (``after=0``)."""
    gw = make_gateway(world)
    t = scanners(gw)
    ok(t.run("vex", "repo", "init", "--timeout", "30s"), world, gw)
    vex_download(t, world, gw, t.fresh_cache())
    world.github_rate_limit(after=0)
    world.clear_log()
    t2 = scanners(gw, "b")
    ok(t2.run("vex", "repo", "init", "--timeout", "30s"), world, gw)
    vex_download(t2, world, gw, t2.fresh_cache())
    record("fault: GitHub rate limit", "warm", world)
    assert world.requests() == [], diag(world, gw)


def test_github_rate_limit_after_ttl_served_stale(world, make_gateway, scanners):
    """Same, but the gateway's GitHub entries have expired (cache.github.ttl): revalidating them
    meets the rate limit (403, X-RateLimit-Remaining: 0); the stale copies must be served."""
    gw = make_gateway(world, {"cache": {"github": {"ttl": "1s"}}})
    t = scanners(gw)
    ok(t.run("vex", "repo", "init", "--timeout", "30s"), world, gw)
    vex_download(t, world, gw, t.fresh_cache())
    time.sleep(1.5)
    world.github_rate_limit(after=0)
    world.clear_log()
    t2 = scanners(gw, "b")
    ok(t2.run("vex", "repo", "init", "--timeout", "30s"), world, gw)
    vex_download(t2, world, gw, t2.fresh_cache())
    record("fault: GitHub rate limit, ttl expired", "warm", world)
    assert world.requests(host=API, status=200) == []


@pytest.fixture(scope="module", autouse=True)
def _print_counts():
    yield
    if COUNTS:
        print("\n\nupstream requests per flow (host → count):")
        for flow, phases in COUNTS.items():
            for phase, c in phases.items():
                hosts = {k: v for k, v in c.items() if k in ALL_HOSTS}
                extra = {k: v for k, v in c.items() if k not in ALL_HOSTS}
                print(f"  {flow:38} {phase:32} total={sum(hosts.values()):3d} {dict(sorted(hosts.items()))}"
                      + (f" {extra}" if extra else ""))
