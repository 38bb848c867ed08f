"""scripts/demo.py end to end with the real Trivy: emulated upstreams, the real gateway wired to
them through address_overrides + ca_bundle, and Trivy cold, warm and with upstreams down."""
from __future__ import annotations

import subprocess
import sys

from tests.e2e_support import require_trivy
from tests.gateway_harness import REPO


def test_demo_runs_cold_warm_and_upstream_down_with_real_trivy(tmp_path):
    require_trivy()
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--run",
                        "--workdir", str(work), "--listen", "127.0.0.1:0",
                        "--admin-listen", "127.0.0.1:0", "--db-mib", "4"],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("[")]
    assert len(lines) == 3 and all(l.startswith("[OK]") for l in lines), r.stdout
    assert " 0 bytes fetched from upstream" not in lines[0]          # cold: fetched once
    assert lines[1].endswith(" 0 bytes fetched from upstream")       # warm: from the cache
    assert lines[2].endswith(" 0 bytes fetched from upstream")       # every upstream refusing
    # the production wiring, and a clean stop
    config = (work / "gateway.yaml").read_text()
    assert "address_overrides" in config and "ca_bundle" in config
    assert "gateway_stopped" in (work / "gateway.log").read_text()
