"""Files the configuration names (TLS certificates and keys, CA bundles, secret files): a missing,
unreadable or unloadable one stops `serve` and `check-config` with one line per problem that
names the key, the file and line that set it, the path and the OS or OpenSSL reason; exit 2 like
every configuration error, and `serve` creates nothing before it (no data dir, no CA, no cache).

Real files in tmp_path, the real CLI as a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.emulated.certs import create_pki
from tests.gateway_harness import REPO, free_port

MISSING = "No such file or directory"


def _run(command: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", command, *args], cwd=str(REPO),
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


def _config(tmp_path: Path, body: str) -> tuple[Path, Path]:
    """A config with free loopback ports, a data dir under tmp_path and ``body`` appended."""
    data = tmp_path / "data"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"server:\n  listen: 127.0.0.1:{free_port()}\n"
                   f"  admin_listen: 127.0.0.1:{free_port()}\n  data_dir: {data}\n" + body)
    return cfg, data


def _line_of(cfg: Path, needle: str) -> int:
    """The line that sets ``needle`` (``ca_bundle``): the first whose key it is."""
    return next(i for i, line in enumerate(cfg.read_text().splitlines(), 1)
                if line.strip().startswith(f"{needle}:") or line.strip() == f"- {needle}:")


def _assert_refused(cfg: Path, data: Path, key: str, needle: str, says: str,
                    check_config: bool = True) -> None:
    """serve (and check-config) exit 2 with ``key in cfg line N: …says…``, create nothing."""
    expected = f"{key} in {cfg} line {_line_of(cfg, needle)}: "
    commands = ["serve", "check-config"] if check_config else ["serve"]
    for command in commands:
        r = _run(command, "--config", str(cfg))
        assert r.returncode == 2, (command, r.stderr)
        lines = [line for line in r.stderr.splitlines() if expected in line]
        assert len(lines) == 1 and says in lines[0], (command, r.stderr)
        assert "Traceback" not in r.stderr and "[Errno" not in r.stderr, r.stderr
        assert not data.exists(), f"{command} created {data} before refusing"


def _mirror(cert: Path, key: Path) -> str:
    return (f"  mirror_listen: 127.0.0.1:{free_port()}\n"
            f"mirror:\n  tls:\n    cert: {cert}\n    key: {key}\n")


def _with_mirror(tmp_path: Path, cert: Path, key: Path) -> tuple[Path, Path]:
    """``_mirror`` must continue the ``server:`` mapping, so it goes before the other sections."""
    data = tmp_path / "data"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"server:\n  listen: 127.0.0.1:{free_port()}\n"
                   f"  admin_listen: 127.0.0.1:{free_port()}\n  data_dir: {data}\n"
                   + _mirror(cert, key))
    return cfg, data


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return create_pki(tmp_path_factory.mktemp("corp-pki"), ("gateway.corp.test",))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    return create_pki(tmp_path_factory.mktemp("other-pki"), ("other.corp.test",))


@pytest.mark.parametrize("which", ["cert", "key"])
def test_missing_mirror_certificate_or_key(tmp_path, pki, which):
    absent = tmp_path / "absent" / f"{which}.pem"
    cert = absent if which == "cert" else pki.server_cert_pem
    key = absent if which == "key" else pki.server_key_pem
    cfg, data = _with_mirror(tmp_path, cert, key)
    _assert_refused(cfg, data, f"mirror.tls.{which}", which,
                    f"cannot read {absent}: {MISSING}")


def test_mirror_key_that_is_a_directory(tmp_path, pki):
    cfg, data = _with_mirror(tmp_path, pki.server_cert_pem, tmp_path)
    _assert_refused(cfg, data, "mirror.tls.key", "key", f"cannot read {tmp_path}: Is a directory")


def test_mirror_certificate_that_is_not_pem(tmp_path, pki):
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate\n")
    cfg, data = _with_mirror(tmp_path, garbage, pki.server_key_pem)
    _assert_refused(cfg, data, "mirror.tls.cert", "cert",
                    f"{garbage} holds no usable PEM certificate (OpenSSL: [X509: "
                    "NO_CERTIFICATE_OR_CRL_FOUND]")


def test_mirror_key_of_another_certificate(tmp_path, pki, other_pki):
    cfg, data = _with_mirror(tmp_path, pki.server_cert_pem, other_pki.server_key_pem)
    _assert_refused(cfg, data, "mirror.tls.key", "key",
                    f"{other_pki.server_key_pem} does not load as the key of "
                    f"{pki.server_cert_pem} (OpenSSL: [X509: KEY_VALUES_MISMATCH]")


def test_mirror_files_are_not_checked_while_the_door_is_off(tmp_path):
    cfg, data = _config(tmp_path, f"mirror:\n  tls:\n    cert: {tmp_path}/no.pem\n"
                                  f"    key: {tmp_path}/no.key\n")
    r = _run("check-config", "--config", str(cfg))
    assert r.returncode == 0 and "configuration OK" in r.stderr, r.stderr


def test_missing_and_garbage_upstream_ca_bundle(tmp_path):
    absent = tmp_path / "absent.pem"
    cfg, data = _config(tmp_path, f"upstream:\n  ca_bundle: {absent}\n")
    _assert_refused(cfg, data, "upstream.ca_bundle", "ca_bundle",
                    f"cannot read {absent}: {MISSING}")
    absent.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    _assert_refused(cfg, data, "upstream.ca_bundle", "ca_bundle",
                    f"{absent} holds no usable PEM certificate (OpenSSL: ")


def test_operator_ca_missing_or_not_matching(tmp_path, pki, other_pki):
    absent = tmp_path / "ca.pem"
    cfg, data = _config(tmp_path, f"tls:\n  ca_cert: {absent}\n  ca_key: {pki.ca_key_pem}\n")
    _assert_refused(cfg, data, "tls.ca_cert", "ca_cert", f"{absent}: {MISSING}")
    cfg, data = _config(tmp_path, f"tls:\n  ca_cert: {pki.ca_pem}\n"
                                  f"  ca_key: {other_pki.ca_key_pem}\n")
    _assert_refused(cfg, data, "tls.ca_key", "ca_key",
                    f"{other_pki.ca_key_pem} is not the key of the certificate in {pki.ca_pem}")


@pytest.mark.parametrize("body, key, needle", [
    ("server:\n  admin_token_file: {absent}\n", "server.admin_token_file", "admin_token_file"),
    ("proxy:\n  auth:\n    enabled: true\n    username: scanner\n    password_file: {absent}\n",
     "proxy.auth.password_file", "password_file"),
    ("tls:\n  ca_cert: {ca}\n  ca_key: {ca_key}\n  ca_key_password_file: {absent}\n",
     "tls.ca_key_password_file", "ca_key_password_file"),
    ("upstream:\n  credentials:\n    - host: ghcr.io\n      secret_file: {absent}\n",
     "upstream.credentials[0].secret_file", "secret_file"),
], ids=["admin_token_file", "proxy_password_file", "ca_key_password_file", "credential_file"])
def test_missing_secret_files(tmp_path, pki, body, key, needle):
    absent = tmp_path / "secrets" / "absent"
    cfg = tmp_path / "gw.yaml"
    data = tmp_path / "data"
    text = body.format(absent=absent, ca=pki.ca_pem, ca_key=pki.ca_key_pem)
    ports = (f"  listen: 127.0.0.1:{free_port()}\n  admin_listen: 127.0.0.1:{free_port()}\n"
             f"  data_dir: {data}\n")
    if text.startswith("server:\n"):
        text = "server:\n" + ports + text.removeprefix("server:\n")
    else:
        text = "server:\n" + ports + text
    cfg.write_text(text)
    _assert_refused(cfg, data, key, needle, f"cannot read {absent}: {MISSING}")


def test_relative_paths_are_checked_by_serve_only(tmp_path):
    """check-config may run elsewhere than the gateway (CI), so a relative path is the serving
    process's business: serve (cwd = the repository here) still names it."""
    relative = f"no-such-dir-{tmp_path.name}/bundle.pem"
    cfg, data = _config(tmp_path, f"upstream:\n  ca_bundle: {relative}\n")
    r = _run("check-config", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    _assert_refused(cfg, data, "upstream.ca_bundle", "ca_bundle",
                    f"cannot read {relative}: {MISSING}", check_config=False)


def test_every_bad_file_is_reported_at_once(tmp_path):
    cfg, data = _with_mirror(tmp_path, tmp_path / "c.pem", tmp_path / "k.pem")
    cfg.write_text(cfg.read_text() + f"upstream:\n  ca_bundle: {tmp_path}/b.pem\n")
    r = _run("serve", "--config", str(cfg))
    assert r.returncode == 2 and "3 problems" in r.stderr, r.stderr
    for key in ("mirror.tls.cert", "mirror.tls.key", "upstream.ca_bundle"):
        assert f"  {key} in {cfg} line " in r.stderr
    assert not data.exists()


def test_ca_init_names_the_operator_ca_and_creates_nothing(tmp_path, pki):
    absent = tmp_path / "ca.pem"
    cfg, data = _config(tmp_path, f"tls:\n  ca_cert: {absent}\n  ca_key: {pki.ca_key_pem}\n")
    r = _run("ca", "init", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert f"tls.ca_cert in {cfg} line {_line_of(cfg, 'ca_cert')}: " in r.stderr
    assert f"{absent}: {MISSING}" in r.stderr and "Traceback" not in r.stderr
    assert not data.exists()


@pytest.mark.parametrize("command", [["serve", "--listen", "127.0.0.1:0",
                                      "--admin-listen", "127.0.0.1:0"], ["ca", "init"]],
                         ids=["serve", "ca_init"])
def test_damaged_ca_in_the_data_dir_is_named_without_a_traceback(tmp_path, command):
    data = tmp_path / "data"
    (data / "ca").mkdir(parents=True)
    (data / "ca" / "ca.pem").write_text("damaged\n")        # its key is gone
    r = _run(*command, "--data-dir", str(data))
    assert r.returncode == 1, r.stderr
    assert (f"cannot use the CA under server.data_dir '{data}' (from flag --data-dir): "
            f"{data}/ca/ca.pem exists but its key") in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (data / "ca").iterdir()) == ["ca.pem"]


def test_secret_file_that_is_not_text(tmp_path):
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe\x00binary")
    cfg, data = _config(tmp_path, "")
    cfg.write_text(cfg.read_text().replace("server:\n", f"server:\n  admin_token_file: {token}\n"))
    _assert_refused(cfg, data, "server.admin_token_file", "admin_token_file",
                    f"{token} is not UTF-8 text")
