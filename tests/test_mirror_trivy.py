"""End to end through the mirror door: the real Trivy 0.76 with NO gateway CA anywhere on the
client (no SSL_CERT_FILE; HTTPS_PROXY points at a dead port so anything that bypassed the mirror
fails) → the gateway's plain-HTTP mirror listener → the emulated world.

What Trivy sends to a mirror is pinned in ../shared/docs/trivy-mirror-facts.md; these tests run
each documented client configuration (trivy.yaml ``registry.mirrors``, ``--db-repository``,
``--checks-bundle-repository``, settings.xml ``<mirrors>``, ``scan.maven.mirrors``,
repository.yaml) cold, then warm with 0 upstream requests.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e_support import (CDN, CODELOAD, GHCR, MAVEN, MIRROR, RAW, TrivyClient,
                               blob_requests, diag, scanner_pool)
from tests.emulated import CUSTOM_CHECK_ID, write_config_project, write_maven_project
from tests.mirror_support import MirrorTrivy, mirror_addr, mirror_config
from tests.test_e2e_trivy import POMS, ok, world  # noqa: F401 - the world fixture is shared

pytestmark = pytest.mark.e2e


@pytest.fixture
def mirror_gw(world, make_gateway):
    return make_gateway(world, mirror_config())


@pytest.fixture
def scanners(tmp_path):
    """``scanners(gw)`` → a :class:`MirrorTrivy` (own HOME, no CA, no proxy)."""
    with scanner_pool(tmp_path, MirrorTrivy) as factory:
        yield factory


def registry_mirrors_yaml(t: MirrorTrivy, gw) -> Path:
    m = mirror_addr(gw)
    return t.write("trivy.yaml", f"registry:\n  mirrors:\n"
                                 f"    mirror.gcr.io:\n      - {m}/mirror.gcr.io\n"
                                 f"    ghcr.io:\n      - {m}/ghcr.io\n")


def assert_db_in(cache: Path, name: str = "db", version: int = 2) -> None:
    meta = json.loads((cache / ("db" if name == "db" else "java-db") / "metadata.json").read_text())
    assert meta["Version"] == version


def test_dbs_via_registry_mirrors_cold_then_warm_then_world_down(world, mirror_gw, scanners):
    gw = mirror_gw
    t = scanners(gw)
    conf = str(registry_mirrors_yaml(t, gw))
    cache = t.fresh_cache()
    ok(t.run("image", "--config", conf, "--download-db-only", "--timeout", "80s", cache=cache),
       world, gw)
    ok(t.run("image", "--config", conf, "--download-java-db-only", "--timeout", "80s",
             cache=cache), world, gw)
    assert_db_in(cache)
    assert_db_in(cache, "java", 1)
    world.wait_idle(10)
    gw.request_events(MIRROR, expect=4)          # log lines are written in batches
    blobs = blob_requests(world)
    assert sorted(b.path.rsplit("/", 1)[1] for b in blobs) == sorted(
        [world.published["db"].layer.digest, world.published["javadb"].layer.digest]), \
        diag(world, gw)
    assert all(b.host == MIRROR for b in blobs) and GHCR not in {e.host for e in world.requests()}
    # Trivy asked the mirror door (plain HTTP, path-prefix form), never the registries
    paths = {e["path"] for e in gw.log_events() if e.get("event") == "request"}
    assert "/v2/mirror.gcr.io/aquasec/trivy-db/manifests/2" in paths, paths
    assert all(e.get("door") == "mirror" for e in gw.log_events() if e.get("event") == "request")

    world.clear_log()
    warm = t.fresh_cache()
    ok(t.run("image", "--config", conf, "--download-db-only", "--timeout", "80s", cache=warm),
       world, gw)
    world.wait_idle(10)
    assert world.requests() == [], "warm mirror flow reached an upstream" + diag(world, gw)

    # every upstream down, the cache warm: Trivy still succeeds
    for host in world.hosts:
        world.refuse(host)
    down = t.fresh_cache()
    ok(t.run("image", "--config", conf, "--download-java-db-only", "--timeout", "80s",
             cache=down), world, gw)
    assert_db_in(down, "java", 1)


def test_db_repository_short_name_and_checks_bundle_cold_then_warm(world, mirror_gw, scanners,
                                                                    tmp_path):
    gw = mirror_gw
    m = mirror_addr(gw)
    t = scanners(gw)
    repo = ("--db-repository", f"{m}/aquasec/trivy-db:2")
    ok(t.run("image", "--download-db-only", "--timeout", "80s", *repo), world, gw)
    proj = tmp_path / "cfg"
    write_config_project(proj)
    checks = ("--checks-bundle-repository", f"{m}/aquasec/trivy-checks:2")
    res = t.run("config", "--format", "json", "--timeout", "80s", *checks, str(proj))
    ok(res, world, gw)
    ids = {x.get("ID") for r in json.loads(res.stdout).get("Results") or []
           for x in r.get("Misconfigurations") or []}
    assert CUSTOM_CHECK_ID in ids, diag(world, gw, res)
    world.wait_idle(10)
    assert {b.host for b in blob_requests(world)} == {MIRROR}, diag(world, gw)
    assert len(blob_requests(world)) == 2, diag(world, gw)

    world.clear_log()
    ok(t.run("image", "--download-db-only", "--timeout", "80s", *repo), world, gw)
    res = t.run("config", "--format", "json", "--timeout", "80s", *checks, str(proj))
    ok(res, world, gw)
    world.wait_idle(10)
    assert world.requests() == [], "warm mirror flow reached an upstream" + diag(world, gw)


def maven_scan(t: MirrorTrivy, world, gw, proj: Path, *extra: str):
    res = t.run("fs", "--format", "cyclonedx", "--timeout", "80s", *extra, str(proj))
    ok(res, world, gw)
    names = {c["name"] for c in json.loads(res.stdout).get("components", [])}
    assert {"demo-lib", "demo-transitive"} <= names, f"{names}" + diag(world, gw, res)


def test_maven_via_settings_xml_then_scan_maven_mirrors(world, mirror_gw, scanners, tmp_path):
    gw = mirror_gw
    proj = tmp_path / "mvn"
    write_maven_project(proj)
    t = scanners(gw)
    t.write(".m2/settings.xml", f"""<settings>
  <mirrors>
    <mirror>
      <id>gateway</id>
      <mirrorOf>central</mirrorOf>
      <url>http://{mirror_addr(gw)}/maven2/</url>
    </mirror>
  </mirrors>
</settings>
""")
    maven_scan(t, world, gw, proj)
    world.wait_idle(10)
    got = world.requests(host=MAVEN)
    assert {e.path for e in got if e.status == 200} == POMS and len(got) == 3, diag(world, gw)
    events = gw.request_events(MAVEN, expect=3)  # asked of the mirror door, same paths
    assert {e["path"] for e in events} == POMS and {e["door"] for e in events} == {"mirror"}

    # a second scanner with scan.maven.mirrors in trivy.yaml: warm, 0 upstream requests
    world.clear_log()
    t2 = scanners(gw)
    conf = t2.write("trivy.yaml", "scan:\n  maven:\n    mirrors:\n"
                                  "      - source: https://repo.maven.apache.org/maven2/\n"
                                  f"        targets:\n          - http://{mirror_addr(gw)}/maven2/\n")
    maven_scan(t2, world, gw, proj, "--config", str(conf))
    world.wait_idle(10)
    assert world.requests() == [], "warm Maven scan reached an upstream" + diag(world, gw)
    assert len(gw.request_events(MAVEN, expect=6)) == 6


def test_vex_repository_yaml_cold_then_warm(world, mirror_gw, scanners):
    gw = mirror_gw
    t = scanners(gw)
    repo_yaml = ("repositories:\n  - name: gateway\n"
                 f"    url: http://{mirror_addr(gw)}/vex/vexhub\n    enabled: true\n")
    t.write(".trivy/vex/repository.yaml", repo_yaml)
    cache = t.fresh_cache()
    res = t.run("vex", "repo", "download", "--timeout", "60s", cache=cache)
    ok(res, world, gw)
    assert (cache / "vex" / "repositories" / "gateway" / "0.1" / "index.json").exists(), \
        diag(world, gw, res)
    world.wait_idle(10)
    assert [e.status for e in world.requests(host=CODELOAD, method="GET")] == [200], diag(world, gw)
    assert RAW in {e.host for e in world.requests()}

    world.clear_log()
    t2 = scanners(gw)
    t2.write(".trivy/vex/repository.yaml", repo_yaml)
    cache2 = t2.fresh_cache()
    res = t2.run("vex", "repo", "download", "--timeout", "60s", cache=cache2)
    ok(res, world, gw)
    assert (cache2 / "vex" / "repositories" / "gateway" / "0.1" / "index.json").exists()
    world.wait_idle(10)
    assert world.requests() == [], "warm VEX flow reached an upstream" + diag(world, gw)


def test_mirror_gcr_refusing_is_served_from_ghcr(world, mirror_gw, scanners):
    gw = mirror_gw
    world.refuse(MIRROR)
    t = scanners(gw)
    cache = t.fresh_cache()
    ok(t.run("image", "--download-db-only", "--timeout", "80s", "--db-repository",
             f"{mirror_addr(gw)}/aquasec/trivy-db:2", cache=cache), world, gw)
    assert_db_in(cache)
    world.wait_idle(10)
    assert [(e.host, e.status) for e in world.requests(host=CDN)] == [(CDN, 200)], diag(world, gw)


def test_unknown_repository_is_a_registry_error_trivy_prints(world, mirror_gw, scanners):
    gw = mirror_gw
    t = scanners(gw)
    res = t.run("image", "--download-db-only", "--timeout", "30s", "--db-repository",
                f"{mirror_addr(gw)}/someone/else-db:2", timeout=60)
    assert res.returncode != 0
    assert "NAME_UNKNOWN" in res.stderr and "mirror.oci.short_names" in res.stderr, res.stderr
    world.wait_idle(5)
    assert world.requests() == []


def test_eight_concurrent_cold_scanners_half_through_each_door_one_blob_get(world, mirror_gw,
                                                                             scanners):
    """A fleet mid-migration: 4 scanners through the mirror door (no CA), 4 through the proxy
    door (with the CA) at once; the DB layer crosses the upstream link once."""
    gw = mirror_gw
    mirror_t = scanners(gw)
    proxy_t = TrivyClient(gw, mirror_t.base.parent / "proxy-door")
    try:
        started = []
        for i in range(8):
            if i % 2:
                started.append((proxy_t, *proxy_t.start("image", "--download-db-only",
                                                          "--timeout", "100s")))
            else:
                started.append((mirror_t, *mirror_t.start(
                    "image", "--download-db-only", "--timeout", "100s", "--db-repository",
                    f"{mirror_addr(gw)}/aquasec/trivy-db:2")))
        for t, p, args in started:
            res = t.finish(p, args, 120)
            ok(res, world, gw)
            assert_db_in(Path(args[args.index("--cache-dir") + 1]))
    finally:
        proxy_t.close()
    world.wait_idle(10)
    assert len(blob_requests(world)) == 1, diag(world, gw)
    assert len(world.requests(host=MIRROR, path_contains="/manifests/")) == 1, diag(world, gw)
    doors = {e.get("door") for e in gw.log_events() if e.get("event") == "request"}
    assert doors == {"proxy", "mirror"}
