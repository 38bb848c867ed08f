"""The lifecycle alerts of deploy/prometheus/alerts.yml fire when they should and only then,
checked with ``promtool test rules`` on synthetic series (no Prometheus server)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ALERTS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
GW = 'instance="gw:9128",job="trivy-gateway"'


def run_promtool(tmp_path: Path, tests: list[dict], series: list[dict]) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required (it is on PATH in CI)"
    # the expressions and `for:` as shipped; annotations dropped (promtool compares them
    # verbatim, and they are prose)
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path = tmp_path / "alerts.yml"
    rules_path.write_text(yaml.safe_dump(rules))
    spec = {"rule_files": [str(rules_path)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": tests}]}
    path = tmp_path / "lifecycle-alerts-test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    res = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_outdated_db_fires_only_while_upstream_has_a_newer_one(tmp_path):
    hours = 3600
    series = [
        # the served DB ages 13 h → 14 h; upstream has a newer one from minute 0 (db) / never (java)
        {"series": f'trivy_gateway_artifact_served_age_seconds{{{GW},artifact="vulnerability_db"}}',
         "values": f"{13 * hours}+60x60"},
        {"series": f'trivy_gateway_artifact_upstream_newer{{{GW},artifact="vulnerability_db"}}',
         "values": "1x60"},
        {"series": f'trivy_gateway_artifact_served_age_seconds{{{GW},artifact="java_db"}}',
         "values": f"{30 * hours}+60x60"},
        {"series": f'trivy_gateway_artifact_upstream_newer{{{GW},artifact="java_db"}}',
         "values": "0x60"},
    ]
    fired = {"exp_labels": {"severity": "warning", "instance": "gw:9128", "job": "trivy-gateway",
                            "artifact": "vulnerability_db"}}
    run_promtool(tmp_path, [
        {"eval_time": "20m", "alertname": "TrivyGatewayServingOutdatedDB", "exp_alerts": []},
        {"eval_time": "45m", "alertname": "TrivyGatewayServingOutdatedDB",
         "exp_alerts": [fired]},
    ], series)


def test_prefetch_failing_fires_after_three_failures_in_a_row(tmp_path):
    series = [{"series": f'trivy_gateway_prefetch_consecutive_failures{{{GW},artifact="java_db"}}',
               "values": "0 1 2 3x40"}]
    run_promtool(tmp_path, [
        {"eval_time": "10m", "alertname": "TrivyGatewayPrefetchFailing", "exp_alerts": []},
        {"eval_time": "25m", "alertname": "TrivyGatewayPrefetchFailing",
         "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "gw:9128",
                                        "artifact": "java_db"}}]},
    ], series)
