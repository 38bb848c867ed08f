"""Operator CLI: commands that read the gateway's state never create it; `ca … --from URL`.

Each test runs ``gateway.cli.main`` in a fresh temporary working directory with no
``TRIVY_GATEWAY_*`` variables, the way a new user runs it from the wrong directory.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.settings import ENV_OVERRIDES


@pytest.fixture
def bare_cwd(tmp_path, monkeypatch):
    for name in [*ENV_OVERRIDES, "TRIVY_GATEWAY_CONFIG"]:
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("argv, says", [
    (["ca", "export"], "no gateway CA"),
    (["ca", "bundle"], "no gateway CA"),
    (["ca", "export", "--data-dir", "elsewhere"], "no gateway CA"),
    (["cache", "stats"], "no gateway cache"),
    (["cache", "ls"], "no gateway cache"),
    (["cache", "purge", "--all"], "no gateway cache"),
    (["cache", "verify"], "no gateway cache"),
])
def test_read_commands_never_create_state(bare_cwd, capsys, argv, says):
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert says in err and "server.data_dir" in err
    assert _tree(bare_cwd) == []        # nothing created: no data dir, no CA, no cache


def test_missing_ca_error_names_flag_origin_and_the_from_option(bare_cwd, tmp_path, capsys):
    missing = tmp_path / "absent" / "gw"
    assert main(["ca", "bundle", "--data-dir", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "flag --data-dir" in err and "--from http://" in err
    assert not missing.parent.exists()


def test_ca_from_running_gateway_and_from_its_data_dir(bare_cwd, make_gateway, capsys):
    gw = make_gateway()
    pem = gw.ca_pem.read_text()
    assert main(["ca", "export", "--from", gw.admin_url]) == 0
    assert capsys.readouterr().out == pem
    assert main(["ca", "bundle", "--from", gw.admin_url + "/ca.pem"]) == 0
    bundle = capsys.readouterr().out
    assert bundle.startswith("# trivy-gateway trust bundle") and bundle.endswith(pem)
    # the data dir is read without creating or touching anything (the key is not needed)
    assert main(["ca", "export", "--data-dir", str(gw.data_dir)]) == 0
    assert capsys.readouterr().out == pem
    assert _tree(bare_cwd) == []


def test_ca_from_unreachable_or_non_ca_answer_fails(bare_cwd, make_gateway, capsys):
    from tests.gateway_harness import free_port

    assert main(["ca", "export", "--from", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "cannot fetch the CA" in capsys.readouterr().err
    gw = make_gateway()
    # /healthz answers "ok": not a certificate, so nothing is printed for a scanner to trust
    assert main(["ca", "export", "--from", gw.admin_url + "/healthz?/ca.pem"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "not hold a PEM certificate" in err


def test_cache_purge_without_filter_requires_all(bare_cwd, make_gateway, capsys):
    gw = make_gateway()
    data = str(gw.data_dir)
    assert main(["cache", "purge", "--data-dir", data]) == 2
    assert "--all" in capsys.readouterr().err
    assert main(["cache", "purge", "--all", "--data-dir", data]) == 0
    assert os.path.isdir(gw.data_dir / "cache")


def test_cache_ls_has_a_header_and_readable_keys(bare_cwd, make_gateway, capsys):
    from gateway.cache.admin import readable_key

    digest = "sha256:" + "ab" * 32
    assert readable_key("tag|ghcr.io/aquasecurity/trivy-db:2|application/json|anonymous") == \
        "ghcr.io/aquasecurity/trivy-db:2"
    assert readable_key(f"blob|{digest}|public") == "sha256:abababababab…"
    assert readable_key("maven|https://repo.maven.apache.org/maven2/a/b/1/b-1.pom|") == \
        "repo.maven.apache.org/maven2/a/b/1/b-1.pom"
    assert readable_key(f"blob|{digest}|{'f' * 32}").endswith("[private: fetched with credentials]")
    # the keys of the current format carry the scheme the gateway fetches with
    assert readable_key(f"blob|https|{digest}|public") == "sha256:abababababab…"
    assert readable_key(f"manifest|https|{digest}|public") == "sha256:abababababab…"
    assert readable_key(f"blob|http|{digest}|public") == "sha256:abababababab… (plain http)"
    assert readable_key(f"blob|https|{digest}|{'f' * 32}").endswith(
        "[private: fetched with credentials]")
    assert readable_key("tag|https://ghcr.io/aquasecurity/trivy-db:2|application/json|public") \
        == "ghcr.io/aquasecurity/trivy-db:2"
    gw = make_gateway()
    assert main(["cache", "ls", "--data-dir", str(gw.data_dir)]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["KIND", "STATUS", "SIZE", "CHECKED", "STATE", "TIER", "RESOURCE"]


def test_ca_init_creates_once_then_export_reads_it(bare_cwd, capsys):
    assert main(["ca", "init", "--data-dir", "gw"]) == 0
    first = capsys.readouterr().err.splitlines()[-1]
    assert "sha256=" in first and (bare_cwd / "gw" / "ca" / "ca.pem").is_file()
    assert main(["ca", "init", "--data-dir", "gw"]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == first   # reused, not replaced
    assert main(["ca", "export", "--data-dir", "gw"]) == 0
    assert capsys.readouterr().out == (bare_cwd / "gw" / "ca" / "ca.pem").read_text()
