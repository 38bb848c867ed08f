"""docs/metrics.md is generated from the metrics catalogue and must match it exactly."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.observability.metrics import ARTIFACTS, CACHE_RESULTS, PREFIX, catalogue

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_metrics_doc.py"
DOC = ROOT / "docs" / "metrics.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_metrics_doc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_doc_matches_the_catalogue():
    generated = _generator().render()
    committed = DOC.read_text("utf-8")
    assert committed == generated, (
        "docs/metrics.md is out of date: run `python scripts/gen_metrics_doc.py` and commit it")


def test_script_check_mode_passes(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_script_check_mode_detects_drift(tmp_path):
    stale = tmp_path / "metrics.md"
    stale.write_text(DOC.read_text("utf-8").replace("trivy_gateway_cache_evictions_total", "x"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check", "--output", str(stale)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "out of date" in proc.stderr


def test_every_metric_is_documented_with_type_and_labels():
    doc = DOC.read_text("utf-8")
    for name, info in catalogue().items():
        base = name if info["type"] != "histogram" else name + "_bucket"
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{base}`")), None)
        assert row, f"{name} missing from docs/metrics.md"
        assert f"| {info['type']} |" in row
        for label in info["labels"]:
            assert f"`{label}`" in row


def test_how_to_use_has_promql_examples():
    doc = DOC.read_text("utf-8")
    assert "## How to use" in doc
    blocks = re.findall(r"```promql\n(.*?)```", doc, re.S)
    joined = "\n".join(blocks)
    assert 'result=~"hit' in joined  # hit ratio
    assert 'source="cache"' in joined  # bytes saved
    assert 'artifact="vulnerability_db"' in joined  # DB age


# -- the catalogue itself follows Prometheus conventions and covers what issue 6 asks for -------

def test_naming_rules_and_bounded_labels():
    for name, info in catalogue().items():
        assert name.startswith(PREFIX), name
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name
        if info["type"] == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        if info["type"] == "histogram":
            assert name.endswith("_seconds"), name
        for label in info["labels"]:
            assert label not in {"url", "path", "digest", "uri", "query", "client", "ip"}, \
                (name, label)
        assert info["help"].strip(), name


@pytest.mark.parametrize("name,labels", [
    ("trivy_gateway_cache_requests_total", {"host", "kind", "result"}),
    ("trivy_gateway_served_bytes_total", {"source"}),
    ("trivy_gateway_upstream_responses_total", {"host", "status"}),
    ("trivy_gateway_upstream_request_duration_seconds", {"host"}),
    ("trivy_gateway_upstream_retries_total", {"host", "reason"}),
    ("trivy_gateway_upstream_retry_after_seconds", {"host"}),
    ("trivy_gateway_upstream_queue_wait_seconds", {"host"}),
    ("trivy_gateway_upstream_queue_depth", {"host"}),
    ("trivy_gateway_upstream_circuit_state", {"host"}),
    ("trivy_gateway_cache_size_bytes", set()),
    ("trivy_gateway_cache_entries", {"type"}),
    ("trivy_gateway_cache_evictions_total", set()),
    ("trivy_gateway_cache_digest_mismatches_total", {"host"}),
    ("trivy_gateway_tls_leaf_certificates_minted_total", set()),
    ("trivy_gateway_denied_total", {"host", "reason"}),
    ("trivy_gateway_artifact_age_seconds", {"artifact"}),
])
def test_issue_6_required_metrics_exist(name, labels):
    cat = catalogue()
    assert name in cat
    assert set(cat[name]["labels"]) == labels


def test_artifact_and_result_values():
    assert set(ARTIFACTS) == {"vulnerability_db", "java_db", "checks_bundle", "vex_hub"}
    assert {"hit", "miss", "stale", "coalesced", "negative", "error"} <= set(CACHE_RESULTS)
