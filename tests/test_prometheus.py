"""The alert rules under Debian's real ``promtool``: syntax, and unit tests for every alert.

- ``promtool check rules`` on deploy/prometheus/alerts.yml and on the rules embedded in the
  Kubernetes PrometheusRule (extracted to a temporary rule file);
- ``promtool test rules`` on deploy/prometheus/tests/*.yml, against both copies of the rules;
- every alert has at least one unit-test case where it fires and one where it stays silent (a new
  alert without tests fails here), and a silent case feeds the metric its expression reads, so it
  is not silent merely for lack of input.

The live check of the Grafana dashboard against a real Prometheus scraping a real gateway is in
tests/test_prometheus_live.py. ``prometheus`` and ``promtool`` come from Debian's ``prometheus``
package (.ci/run installs it); missing tools are a failure, never a skip.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:  # tests/ is on sys.path (rootdir-relative import mode) or a package
    from test_deploy_artifacts import ALERTS, K8S, promql_metric_names
except ImportError:  # pragma: no cover
    from tests.test_deploy_artifacts import ALERTS, K8S, promql_metric_names

RULE_TESTS_DIR = ALERTS.parent / "tests"
RULE_TESTS = sorted(RULE_TESTS_DIR.glob("*.yml"))
PROMTOOL_TIMEOUT = 120


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} not on PATH: install Debian's 'prometheus' package (.ci/run does)")
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT)


def load(path: Path):
    return yaml.safe_load(path.read_text("utf-8"))


def alert_rules() -> dict[str, dict]:
    return {r["alert"]: r for g in load(ALERTS)["groups"] for r in g["rules"] if "alert" in r}


@pytest.fixture
def k8s_rule_file(tmp_path) -> Path:
    """The PrometheusRule's spec.groups as a plain Prometheus rule file."""
    docs = [d for d in yaml.safe_load_all((K8S / "prometheusrule.yaml").read_text("utf-8")) if d]
    rule = next(d for d in docs if d.get("kind") == "PrometheusRule")
    path = tmp_path / "prometheusrule-rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def test_promtool_check_rules_alerts_yml():
    res = promtool("check", "rules", str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in res.stdout, res.stdout


def test_promtool_check_rules_kubernetes_prometheusrule(k8s_rule_file):
    res = promtool("check", "rules", str(k8s_rule_file))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in res.stdout, res.stdout


def test_promtool_check_config_compose_prometheus_yml(tmp_path):
    """deploy/prometheus/prometheus.yml as Compose mounts it (the rule file at its mount path
    replaced by the real file)."""
    cfg = load(ALERTS.parent / "prometheus.yml")
    cfg["rule_files"] = [str(ALERTS)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = promtool("check", "config", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_rule_unit_tests_exist():
    assert RULE_TESTS, f"no promtool unit tests in {RULE_TESTS_DIR}"
    for path in RULE_TESTS:
        files = [(path.parent / f).resolve() for f in load(path)["rule_files"]]
        assert files == [ALERTS.resolve()], f"{path.name} must test {ALERTS}: {files}"


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_test_rules(test_file):
    res = promtool("test", "rules", test_file.name, cwd=test_file.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout, res.stdout


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_test_rules_against_the_kubernetes_copy(test_file, k8s_rule_file, tmp_path):
    """The same unit tests pass against the PrometheusRule's rules (not only alerts.yml)."""
    spec = load(test_file)
    spec["rule_files"] = [str(k8s_rule_file)]
    copy = tmp_path / test_file.name
    copy.write_text(yaml.safe_dump(spec, sort_keys=False))
    res = promtool("test", "rules", copy.name, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def _cases() -> list[tuple[str, str, bool, set[str]]]:
    """(file, alert, fires?, metric names in the case's input series) for every alert case."""
    out = []
    for path in RULE_TESTS:
        for test in load(path)["tests"]:
            fed = {s["series"].split("{")[0].strip() for s in test.get("input_series", [])}
            for case in test.get("alert_rule_test", []):
                out.append((path.name, case["alertname"], bool(case.get("exp_alerts")), fed))
    return out


def test_every_alert_has_a_firing_and_a_silent_case():
    cases = _cases()
    missing = []
    for name in alert_rules():
        if not any(alert == name and fires for _, alert, fires, _ in cases):
            missing.append(f"{name}: no case where it fires")
        if not any(alert == name and not fires for _, alert, fires, _ in cases):
            missing.append(f"{name}: no case where it stays silent")
    assert not missing, "alerts without promtool unit tests in deploy/prometheus/tests/:\n" + \
        "\n".join(missing)
    unknown = {alert for _, alert, _, _ in cases} - set(alert_rules())
    assert not unknown, f"unit tests name alerts that do not exist: {unknown}"


def test_silent_cases_feed_the_alerts_metrics():
    """A silent case proves something only if the alert's metrics are there, below threshold."""
    rules = alert_rules()
    empty = [(f, alert) for f, alert, fires, fed in _cases()
             if not fires and not promql_metric_names(rules[alert]["expr"]) & fed]
    assert not empty, f"silent cases without any input for the alert's expression: {empty}"


def test_completeness_check_catches_an_alert_without_tests(monkeypatch):
    """The check above really fails for an alert that has no unit tests."""
    extra = dict(alert_rules(), TrivyGatewayBrandNew={"alert": "TrivyGatewayBrandNew",
                                                      "expr": "vector(1)"})
    monkeypatch.setitem(globals(), "alert_rules", lambda: extra)
    with pytest.raises(AssertionError, match="TrivyGatewayBrandNew: no case where it fires"):
        test_every_alert_has_a_firing_and_a_silent_case()
