"""`trivy-gateway serve` start-up failures: named after the setting and where it came from,
nothing created, nothing leaked; one data dir belongs to one gateway (lock file)."""
from __future__ import annotations

import socket
import subprocess
import sys

from tests.gateway_harness import REPO, free_port


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "serve", *args], cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


def test_taken_port_names_the_flag_and_creates_nothing(tmp_path):
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag, other in (("--listen", "--admin-listen"), ("--admin-listen", "--listen")):
            r = _serve(flag, f"127.0.0.1:{port}", other, f"127.0.0.1:{free_port()}",
                       "--data-dir", str(data))
            assert r.returncode == 1, r.stderr
            key = flag.lstrip("-").replace("-", "_")
            assert f"server.{key} '127.0.0.1:{port}' (from flag {flag})" in r.stderr
            assert "in use" in r.stderr
            assert "Unclosed" not in r.stderr and "Traceback" not in r.stderr
            assert not data.exists()


def test_unusable_data_dir_names_server_data_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"server:\n  data_dir: {blocker}/data\n  listen: 127.0.0.1:{free_port()}\n"
                   f"  admin_listen: 127.0.0.1:{free_port()}\n")
    r = _serve("--config", str(cfg))
    assert r.returncode == 1
    assert f"server.data_dir '{blocker}/data' (from {cfg} line 2)" in r.stderr
    assert "Not a directory" in r.stderr and "Traceback" not in r.stderr


def test_second_gateway_on_the_same_data_dir_refuses(make_gateway):
    gw = make_gateway()
    r = _serve("--data-dir", str(gw.data_dir), "--listen", f"127.0.0.1:{free_port()}",
               "--admin-listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1
    assert f"another gateway (pid {gw.proc.pid}) is using server.data_dir" in r.stderr
    assert gw.status()["ready"] is True          # the first one is untouched
    assert gw.stop() == 0
