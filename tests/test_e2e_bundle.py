"""Air-gap bundle end to end: real Trivy 0.76 warms gateway A through the emulated world,
``bundle export`` writes A's content, ``bundle import`` merges it into a *running* gateway B that
has no upstream at all (every upstream host overridden to a closed port), and every Trivy flow —
vulnerability DB, Java DB, checks bundle, VEX Hub, Maven POMs — then succeeds through B with not
one request reaching the world.
"""
from __future__ import annotations

import sys
import time

import pytest

from gateway.cache.entries import PURGE_CHECK_INTERVAL
from tests.e2e_support import TrivyClient, diag, require_trivy
from tests.emulated import write_config_project, write_maven_project
from tests.emulated.services import vex_repository_manifest
from tests.gateway_harness import REPO, free_port
from tests.test_e2e_trivy import assert_db_in, config_scan, db_only, maven_scan, ok, vex_download

pytestmark = pytest.mark.e2e


def run_cli(*args: str):
    import subprocess

    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)


def all_flows(t: TrivyClient, world, gw, tmp_path, tag: str) -> None:
    cache = t.fresh_cache()
    ok(db_only(t, cache=cache), world, gw)
    assert_db_in(cache)
    java = t.fresh_cache()
    ok(t.run("image", "--download-java-db-only", "--timeout", "80s", cache=java), world, gw)
    assert (java / "java-db" / "trivy-java.db").exists()
    proj = tmp_path / f"cfg-{tag}"
    write_config_project(proj)
    config_scan(t, world, gw, proj)
    ok(t.run("vex", "repo", "init", "--timeout", "30s"), world, gw)
    vex_download(t, world, gw, t.fresh_cache())
    mvn = tmp_path / f"mvn-{tag}"
    write_maven_project(mvn)
    maven_scan(t, world, gw, mvn)


def test_bundle_from_warm_gateway_serves_every_flow_on_a_gateway_without_upstream(
        clean_upstreams, make_gateway, tmp_path):
    require_trivy()
    world = clean_upstreams
    world.github.set_manifest(vex_repository_manifest())
    a = make_gateway(world, name="connected")
    ta = TrivyClient(a, tmp_path / "scanner-a")
    tb = None
    try:
        all_flows(ta, world, a, tmp_path, "a")
        bundle = tmp_path / "site.tar"
        res = run_cli("bundle", "export", "--config", str(a.config_path), "--maven", "--vex",
                      "-o", str(bundle))
        assert res.returncode == 0, res.stderr
        assert "export:" in res.stderr and "exported" in res.stderr, res.stderr

        closed = f"127.0.0.1:{free_port()}"
        offline = {"upstream": {"address_overrides": {h: closed for h in world.hosts},
                                "connect_timeout": "1s"}}
        b = make_gateway(None, offline, name="airgapped")
        res = run_cli("bundle", "import", "--config", str(b.config_path), str(bundle))
        assert res.returncode == 0, res.stderr
        assert "import:" in res.stderr and "imported" in res.stderr, res.stderr
        # the running gateway re-reads the cache directory after an operator change within
        # this interval (the documented propagation delay, not a TTL)
        time.sleep(PURGE_CHECK_INTERVAL + 0.2)

        world.clear_log()
        tb = TrivyClient(b, tmp_path / "scanner-b")
        all_flows(tb, world, b, tmp_path, "b")
        world.wait_idle(10)
        assert world.requests() == [], "the air-gapped gateway reached the world" + diag(world, b)
        results = {e.get("cache") for e in b.log_events() if e.get("event") == "request"
                   and e.get("method") != "CONNECT" and e.get("cache")}
        assert results <= {"hit", "stale", "negative", "revalidated"}, (results, b.log_tail(40))
    finally:
        ta.close()
        if tb is not None:
            tb.close()
