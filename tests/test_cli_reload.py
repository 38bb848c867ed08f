"""Live reload: SIGHUP / `trivy-gateway reload` apply a new policy to new connections while a
100 MiB transfer continues intact; an invalid configuration is refused and the old one stays;
keys that need a restart are reported, not half-applied."""
from __future__ import annotations

import hashlib
import http.client
import os
import signal
import subprocess
import sys
import time

import yaml

from gateway.settings import load_settings
from tests.gateway_harness import REPO

MIB = 1024 * 1024


def _tunnel(gw, host: str) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection("127.0.0.1", gw.proxy_port, context=gw.client_ssl(),
                                       timeout=60)
    conn.set_tunnel(host, 443)
    return conn


def _status_of(gw, host: str, path: str) -> int:
    conn = _tunnel(gw, host)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError as exc:            # CONNECT refused: "Tunnel connection failed: 403 …"
        return 403 if " 403" in str(exc) else -1
    finally:
        conn.close()


def _wait_reload(gw, before) -> dict:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        config = gw.status()["config"]
        if config["last_reload"] and config["last_reload"] != before:
            return config
        time.sleep(0.05)
    raise AssertionError("no reload report:\n" + gw.log_tail())


def _default_rules() -> list[dict]:
    return [{"host": r.host, "action": r.action, "ports": list(r.ports)}
            for r in load_settings(env={}).policy.rules]


def _cli_reload(gw, config_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIVY_GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway", "reload", "--config", str(config_path)],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=60)


def test_sighup_new_rule_for_new_connections_while_100mib_transfer_continues(
        clean_upstreams, make_gateway):
    world = clean_upstreams
    art = world.publish_db(revision=1401, size_mib=100)
    gw = make_gateway(world)
    manifest = "/v2/aquasecurity/trivy-db/manifests/2"
    assert _status_of(gw, "ghcr.io", manifest) == 200
    digest_before = gw.status()["config"]["digest"]

    big = _tunnel(gw, "mirror.gcr.io")
    big.request("GET", f"/v2/aquasec/trivy-db/blobs/{art.layer.digest}")
    resp = big.getresponse()
    assert resp.status == 200
    hasher = hashlib.sha256()
    first = resp.read(MIB)
    hasher.update(first)
    received = len(first)

    gw.config["policy"] = {"rules": [{"host": "ghcr.io", "action": "deny",
                                      "reason": "ghcr.io is off while we test the reload"}]
                           + _default_rules()}
    gw.config_path.write_text(yaml.safe_dump(gw.config))
    os.kill(gw.proc.pid, signal.SIGHUP)
    config = _wait_reload(gw, None)
    assert config["last_reload"]["result"] == "applied"
    assert config["last_reload"]["applied"] == ["policy"]
    assert config["digest"] != digest_before
    assert _status_of(gw, "ghcr.io", manifest) == 403            # new connections: new rule

    while chunk := resp.read(4 * MIB):                           # the old transfer: intact
        hasher.update(chunk)
        received += len(chunk)
    big.close()
    assert received == art.layer.size
    assert "sha256:" + hasher.hexdigest() == art.layer.digest
    assert gw.metric("trivy_gateway_config_reloads_total", result="applied") == 1
    assert gw.metric("trivy_gateway_config_info", digest=config["digest"]) == 1
    events = [e for e in gw.log_events() if e.get("event") == "config_reloaded"]
    assert events and events[-1]["digest"] == config["digest"]


def test_invalid_reload_is_refused_and_the_old_config_stays(make_gateway, tmp_path):
    gw = make_gateway()
    digest = gw.status()["config"]["digest"]
    good = gw.config_path.read_text()
    bad = good + "cache:\n  max_size: 10\nsource: elsewhere\n"
    gw.config_path.write_text(bad)
    # the CLI validates first and signals nothing
    r = _cli_reload(gw, gw.config_path)
    assert r.returncode == 2 and "cache.max_size" in r.stderr
    assert gw.status()["config"]["last_reload"] is None
    # a bare SIGHUP: the gateway itself refuses, with every error, and keeps running as before
    os.kill(gw.proc.pid, signal.SIGHUP)
    config = _wait_reload(gw, None)
    report = config["last_reload"]
    assert report["result"] == "refused" and config["digest"] == digest
    assert any("source" in e and "unknown key" in e for e in report["errors"])
    assert gw.metric("trivy_gateway_config_reloads_total", result="refused") == 1
    assert gw.status()["ready"] is True


def test_reload_naming_a_missing_file_is_refused(make_gateway, tmp_path):
    """A restart-only key (upstream.ca_bundle) pointing at nothing would pass a reload and
    break the next restart: the CLI and the gateway refuse it, naming the key and its line."""
    gw = make_gateway()
    gone = tmp_path / "gone.pem"
    gw.config.setdefault("upstream", {})["ca_bundle"] = str(gone)
    gw.config_path.write_text(yaml.safe_dump(gw.config))
    r = _cli_reload(gw, gw.config_path)
    assert r.returncode == 2, r.stderr
    assert f"upstream.ca_bundle in {gw.config_path} line " in r.stderr
    assert f"cannot read {gone}: No such file or directory" in r.stderr
    assert gw.status()["config"]["last_reload"] is None
    os.kill(gw.proc.pid, signal.SIGHUP)
    report = _wait_reload(gw, None)["last_reload"]
    assert report["result"] == "refused"
    assert any(e.startswith("upstream.ca_bundle in ") and str(gone) in e for e in report["errors"])
    assert gw.status()["ready"] is True


def test_cli_reload_reports_applied_and_restart_needed_keys(make_gateway):
    gw = make_gateway()
    gw.config["server"]["drain_grace"] = "3s"
    gw.config["cache"]["max_size"] = "2GiB"
    gw.config_path.write_text(yaml.safe_dump(gw.config))
    r = _cli_reload(gw, gw.config_path)
    assert r.returncode == 0, r.stderr
    assert "applied: server.drain_grace" in r.stderr
    assert "needs a restart to take effect: cache.max_size" in r.stderr
    status = gw.status()
    assert status["cache"]["max_size_bytes"] != 2 * 1024**3     # the running value stays


def test_split_changes_applies_live_keys_and_keeps_restart_keys(tmp_path):
    from gateway.reload import split_changes

    secret = tmp_path / "token"
    secret.write_text("t1")
    base = {"server": {"listen": "127.0.0.1:1"},
            "upstream": {"credentials": [{"host": "ghcr.io", "type": "bearer",
                                          "secret_file": str(secret)}]}}
    old = load_settings(env={}, overrides=base)
    secret.write_text("t2")                                    # a rotated credential
    new = load_settings(env={}, overrides={
        "server": {"listen": "127.0.0.1:2"},
        "upstream": {"credentials": base["upstream"]["credentials"],
                     "limits": {"ghcr.io": {"rate": 1.0}}},
        "cache": {"oci": {"tag_ttl": {"default": "5m"}}, "max_size": "2GiB"}})
    effective, applied, restart = split_changes(old, new)
    assert sorted(applied) == ["cache.oci", "upstream.credentials", "upstream.limits"]
    assert sorted(restart) == ["cache.max_size", "server.listen"]
    assert effective.upstream.credentials[0].secret == "t2"
    assert effective.upstream.limit_for("ghcr.io").rate == 1.0
    assert effective.cache.oci.ttl_for("mirror.gcr.io", "x/y") == 300
    assert effective.server.listen == "127.0.0.1:1" and effective.cache.max_size == old.cache.max_size


def test_shared_state_and_workers_need_a_restart():
    """cache.shared (Redis, S3, peer endpoint) and server.workers are wired once at start-up
    (docs/scale-out.md): a reload reports them as restart-needed and keeps the running values."""
    from gateway.reload import RELOADABLE, split_changes

    redis = "redis://127.0.0.1:6379/0"
    old = load_settings(env={}, overrides={"cache": {"shared": {"redis_url": redis}}})
    new = load_settings(env={}, overrides={
        "server": {"workers": "2"},
        "cache": {"shared": {"redis_url": "redis://127.0.0.1:6380/0", "lease_ttl": "9s"}}})
    effective, applied, restart = split_changes(old, new)
    assert applied == [] and sorted(restart) == ["cache.shared", "server.workers"]
    assert effective.cache.shared == old.cache.shared and effective.server.workers == "1"
    assert not {"cache", "cache.shared", "server", "server.workers"} & RELOADABLE
