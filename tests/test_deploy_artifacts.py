"""Deployment artifacts are consistent with the code: no Docker engine or cluster runs here, so
everything a container, a Compose project, a Kubernetes cluster or systemd would trip over is
checked statically (and the image's HEALTHCHECK command is run for real against an admin server).

- every YAML/JSON file under deploy/ parses and has the keys its consumer needs;
- every metric named in a dashboard or alert expression is exported by the running code;
- ports, paths, env names and CLI invocations agree with gateway/settings and gateway/cli.py.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from gateway.observability.metrics import ARTIFACTS, Metrics, catalogue
from gateway.settings import ENV_OVERRIDES, ProxyAuthSettings, ServerSettings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "trivy-gateway.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "trivy-gateway.service"
DOCKERFILE = ROOT / "Dockerfile"

PROXY_PORT = ServerSettings().listen_addr[1]
ADMIN_PORT = ServerSettings().admin_addr[1]
#: the mirror door's documented port (server.mirror_listen is off by default; deploy/ opens it)
MIRROR_PORT = 5000
#: env names the gateway reads: the overrides, the config path and the proxy password
GATEWAY_ENV = set(ENV_OVERRIDES) | {"TRIVY_GATEWAY_CONFIG", ProxyAuthSettings().password_env,
                                    ServerSettings().admin_token_env}


def yaml_docs(path: Path) -> list:
    with path.open(encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def load_yaml(path: Path):
    docs = yaml_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document"
    return docs[0]


# =============================================================================================
# PromQL metric names
# =============================================================================================

PROMQL_WORDS = {
    # aggregation operators and modifiers
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left",
    "group_right", "bool", "and", "or", "unless", "offset", "atan2", "start", "end",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "double_exponential_smoothing",
    "hour", "idelta", "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10",
    "minute", "month", "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort",
    "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt", "time", "timestamp", "vector",
    "year", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
    "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
    "present_over_time", "mad_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "rad", "pi", "inf", "nan",
    # Grafana query helpers (label_values(...) in variables)
    "label_values", "label_names", "metrics", "query_result",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (labels, functions, keywords removed)."""
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", expr)                   # Grafana variables
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', text)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)                           # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                          # ranges, subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)", text):
        word = m.group(1)
        if word in PROMQL_WORDS:
            continue
        rest = text[m.end():].lstrip()
        if rest.startswith("(") and word not in exported_names():
            continue  # some other function; a metric is never followed by "("
        names.add(word)
    return names


_EXPORTED: set[str] = set()


def exported_names() -> set[str]:
    """Every series name the running code exports (histogram series included), plus ``up``."""
    if not _EXPORTED:
        for name, info in catalogue().items():
            _EXPORTED.add(name)
            if info["type"] == "histogram":
                _EXPORTED.update(name + s for s in ("_bucket", "_sum", "_count"))
        # cross-check against what a live registry really exposes
        from prometheus_client import generate_latest

        m = Metrics()
        m.upstream_latency.labels("ghcr.io").observe(0.1)
        m.build_info.info({"version": "test"})
        live = {line.split("{")[0].split(" ")[0] for line in generate_latest(m.registry).decode()
                .splitlines() if line and not line.startswith("#")}
        assert live <= _EXPORTED | {n.replace("_total", "_created") for n in _EXPORTED} | {
            n + "_created" for n in _EXPORTED}, live - _EXPORTED
        _EXPORTED.add("up")
    return _EXPORTED


def known_metric(name: str) -> bool:
    return name in exported_names()


@pytest.mark.parametrize("expr,expected", [
    ('sum by (host) (rate(trivy_gateway_upstream_responses_total{status="429", instance=~"$instance"}[5m]))',
     {"trivy_gateway_upstream_responses_total"}),
    ("histogram_quantile(0.95, sum by (le, host) (rate(x_seconds_bucket[$__rate_interval])))",
     {"x_seconds_bucket"}),
    ('up{job="trivy-gateway"} == 0', {"up"}),
    ("a / (b > 0) > 0.9", {"a", "b"}),
    ("count(max by (host) (m) == 2) or vector(0)", {"m"}),
    ('label_values(trivy_gateway_build_info, instance)', {"trivy_gateway_build_info", "instance"}),
    ("increase(foo_total[1h] offset 1d) > 0", {"foo_total"}),
])
def test_promql_extractor(expr, expected):
    assert promql_metric_names(expr) == expected


def test_extractor_catches_an_unknown_metric():
    names = promql_metric_names('rate(trivy_gateway_no_such_thing_total{host="x"}[5m])')
    assert names == {"trivy_gateway_no_such_thing_total"}
    assert not known_metric("trivy_gateway_no_such_thing_total")


# =============================================================================================
# every file parses
# =============================================================================================

def deploy_files(*suffixes: str) -> list[Path]:
    # Helm templates are not YAML until rendered: tests/test_helm_chart.py renders them
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes
                  and "templates" not in p.relative_to(DEPLOY).parts[:-1])


def test_deploy_tree_has_the_expected_files():
    for rel in ("docker-compose.yml", "prometheus/prometheus.yml", "prometheus/alerts.yml",
                "grafana/dashboards/trivy-gateway.json",
                "grafana/provisioning/datasources/prometheus.yaml",
                "grafana/provisioning/dashboards/trivy-gateway.yaml",
                "dependency-track/docker-compose.yml", "dependency-track/README.md",
                "kubernetes/kustomization.yaml", "kubernetes/README.md",
                "kubernetes/trivy-operator-values.yaml", "systemd/trivy-gateway.service"):
        assert (DEPLOY / rel).is_file(), rel


@pytest.mark.parametrize("path", deploy_files(".yml", ".yaml"), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    docs = yaml_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: top level must be a mapping"


@pytest.mark.parametrize("path", deploy_files(".json"), ids=lambda p: str(p.relative_to(ROOT)))
def test_json_parses(path):
    assert isinstance(json.loads(path.read_text("utf-8")), dict)


# =============================================================================================
# Grafana
# =============================================================================================

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text("utf-8"))


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        if var.get("type") == "query":
            out.append((f"variable {var['name']}", query["query"] if isinstance(query, dict) else query))
    return out


def test_dashboard_structure():
    d = dashboard()
    for key in ("uid", "title", "panels", "schemaVersion", "templating", "time", "refresh"):
        assert key in d, key
    assert d["uid"] == "trivy-gateway"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(g), p["title"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for dx in range(g["w"]):
            for dy in range(g["h"]):
                cell = (g["x"] + dx, g["y"] + dy)
                assert cell not in cells, f"panel {p['title']!r} overlaps another"
                cells.add(cell)
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]


def test_dashboard_metrics_are_exported():
    unknown = {}
    total = set()
    for title, expr in dashboard_exprs():
        names = promql_metric_names(expr) - {"instance"}
        total |= names
        bad = {n for n in names if not known_metric(n)}
        if bad:
            unknown[title] = sorted(bad)
    assert not unknown, f"dashboard expressions name metrics the gateway does not export: {unknown}"
    assert len(total) >= 20, sorted(total)


def test_dashboard_has_the_required_panels():
    exprs = "\n".join(e for _, e in dashboard_exprs())
    titles = " | ".join(p["title"] for p in dashboard()["panels"]).lower()
    for needle in ("hit ratio", "bytes", "429", "circuit", "artifact age", "denied", "latency",
                   "cache disk", "evictions", "digest mismatch", "fills in flight"):
        assert needle in titles, needle
    assert re.search(r'result=~"hit\|stale\|coalesced\|negative\|revalidated"', exprs)
    assert 'status="429"' in exprs
    assert "histogram_quantile" in exprs and "trivy_gateway_request_duration_seconds_bucket" in exprs
    assert "trivy_gateway_upstream_request_duration_seconds_bucket" in exprs
    assert "trivy_gateway_cache_size_bytes" in exprs and "trivy_gateway_cache_max_size_bytes" in exprs
    age = next(e for t, e in dashboard_exprs() if "artifact age" in t.lower())
    for artifact in ARTIFACTS:
        assert artifact in age, artifact
    circuit = next(p for p in dashboard()["panels"] if p["title"] == "Circuit state per host")
    texts = {v["text"] for m in circuit["fieldConfig"]["defaults"]["mappings"]
             for v in m["options"].values()}
    assert texts == {"closed", "half-open", "open"}


def test_grafana_provisioning_matches_dashboard_and_compose():
    ds = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://prometheus:9090")
    var = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert var["current"]["value"] == source["uid"]
    prov = load_yaml(DEPLOY / "grafana/provisioning/dashboards/trivy-gateway.yaml")
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    grafana = compose()["services"]["grafana"]
    targets = {parse_mount(v)[1]: parse_mount(v)[0] for v in grafana["volumes"]}
    assert targets[provider["options"]["path"]] == "./grafana/dashboards"
    assert targets["/etc/grafana/provisioning"] == "./grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home).parent == PurePosixPath(provider["options"]["path"])
    assert PurePosixPath(home).name == DASHBOARD.name


# =============================================================================================
# Prometheus
# =============================================================================================

def alert_rules() -> list[dict]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]


def test_alert_rules_structure():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        if "for" in r:
            assert re.fullmatch(r"(\d+[smhdwy])+", r["for"]), r["for"]
        assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]


def test_alert_metrics_are_exported():
    unknown = {}
    for r in alert_rules():
        bad = {n for n in promql_metric_names(r["expr"]) if not known_metric(n)}
        if bad:
            unknown[r["alert"]] = sorted(bad)
    assert not unknown, f"alert expressions name metrics the gateway does not export: {unknown}"


def test_required_alerts():
    by_expr = {r["alert"]: " ".join(r["expr"].split()) for r in alert_rules()}
    exprs = "\n".join(by_expr.values())
    # the DB scanners get, by its own date; not while the outdated-DB alert covers it
    stale = by_expr["TrivyGatewayVulnerabilityDBStale"]
    assert 'trivy_gateway_artifact_served_age_seconds{artifact="vulnerability_db"}' in stale
    assert stale.endswith(") > 86400 unless on (instance, artifact) "
                          "trivy_gateway_artifact_upstream_newer == 1"), stale
    assert "trivy_gateway_artifact_upstream_newer == 1" in by_expr["TrivyGatewayServingOutdatedDB"]
    assert re.search(r"trivy_gateway_upstream_circuit_state\) == 2", exprs)
    assert re.search(r'trivy_gateway_upstream_responses_total\{status="429"\}\[\d+m\]', exprs)
    assert re.search(r"trivy_gateway_cache_size_bytes / \(trivy_gateway_cache_max_size_bytes > 0\) > 0\.9", exprs)
    assert "trivy_gateway_denied_total" in exprs
    assert re.search(r'up\{job="trivy-gateway"\} == 0', exprs)
    # the job label used by the alerts is the scrape job's name
    jobs = [j["job_name"] for j in load_yaml(DEPLOY / "prometheus/prometheus.yml")["scrape_configs"]]
    assert "trivy-gateway" in jobs


def test_prometheus_config_matches_compose():
    prom = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "trivy-gateway")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"gateway:{ADMIN_PORT}"]
    mounts = {parse_mount(v)[1]: parse_mount(v)[0] for v in compose()["services"]["prometheus"]["volumes"]}
    for rule_file in prom["rule_files"]:
        assert rule_file in mounts, rule_file
        assert (DEPLOY / mounts[rule_file]).resolve() == ALERTS.resolve()


def test_prometheus_rule_mirrors_alerts_yml():
    rule = load_yaml(K8S / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"]


# =============================================================================================
# CLI invocations
# =============================================================================================

def cli_parser():
    from gateway.cli import build_parser

    return build_parser()


SHELL_OPERATORS = {"&&", "||", ";", "|", ">", ">>", "<", "2>", "&"}


def cli_invocations(text: str) -> list[list[str]]:
    """Every ``trivy-gateway …`` (or ``…/bin/trivy-gateway …``) in a command line, as argv."""
    out = []
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        words = text.split()
    for i, word in enumerate(words):
        if PurePosixPath(word).name == "trivy-gateway" and not word.startswith(("/etc", "/var")):
            argv = []
            for w in words[i + 1:]:
                if w in SHELL_OPERATORS or w.startswith((">", "2>")) or w.endswith(";"):
                    if w.endswith(";") and w != ";":
                        argv.append(w[:-1])
                    break
                argv.append(w)
            out.append(argv)
    return out


def command_lines(lines) -> list[list[str]]:
    """CLI calls in shell-like lines: those starting with the command (or a path to it)."""
    calls = []
    for line in lines:
        line = line.strip().lstrip("$ ").strip()
        first = line.split(" ", 1)[0]
        if PurePosixPath(first).name == "trivy-gateway" or line.startswith("trivy-gateway "):
            calls += cli_invocations(line)
    return calls


def assert_cli_accepts(argv: list[str], where: str) -> None:
    parser = cli_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `trivy-gateway {' '.join(argv)}` is not a valid CLI call") from exc
    assert args.command, f"{where}: no subcommand in {argv}"


def test_cli_has_the_subcommands_the_artifacts_use():
    parser = cli_parser()
    for argv in (["serve"], ["serve", "--config", "f", "--listen", "0.0.0.0:3128",
                             "--admin-listen", "0.0.0.0:9128", "--data-dir", "/data"],
                 ["ca", "export", "--data-dir", "/data"], ["ca", "bundle", "--data-dir", "/data"],
                 ["check-config", "--config", "f"], ["cache", "stats"], ["cache", "ls"],
                 ["cache", "purge"], ["cache", "verify"]):
        parser.parse_args(argv)


def test_pyproject_console_script():
    text = (ROOT / "pyproject.toml").read_text("utf-8")
    assert re.search(r'^trivy-gateway = "gateway\.cli:main"$', text, re.M)


# =============================================================================================
# Dockerfile
# =============================================================================================

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text("utf-8")
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for token in shlex.split(rest):
                if "=" in token:
                    k, v = token.split("=", 1)
                    env[k] = v
    return env


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def test_dockerfile_base_user_ports_volume_cmd():
    ins = dockerfile_instructions()
    args = {r.split("=", 1)[0]: r.split("=", 1)[1] for w, r in ins if w == "ARG" and "=" in r}
    froms = [r.split()[0] for w, r in ins if w == "FROM"]
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert image == "python:3.11-slim", image
    stage = final_stage()
    users = [r for w, r in stage if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    expose = {int(p.split("/")[0]) for w, r in stage if w == "EXPOSE" for p in r.split()}
    assert expose == {PROXY_PORT, ADMIN_PORT, MIRROR_PORT}
    volumes = [json.loads(r) if r.startswith("[") else r.split() for w, r in stage if w == "VOLUME"]
    assert ["/data"] in volumes
    cmd = [json.loads(r) for w, r in stage if w == "CMD"]
    assert cmd[-1] == ["trivy-gateway", "serve"]
    assert_cli_accepts(cmd[-1][1:], "Dockerfile CMD")
    assert not [w for w, _ in stage if w == "ENTRYPOINT"]
    assert any(w == "RUN" and re.search(r"pip (install|wheel)\b.*(\s\.|\.whl)", r) for w, r in ins)


def test_dockerfile_env_and_config_path():
    env = dockerfile_env()
    for name in env:
        if name.startswith("TRIVY_GATEWAY_"):
            assert name in GATEWAY_ENV, f"Dockerfile sets {name}, which the gateway does not read"
    # the data dir is said by the shipped file, not by env: env would override a mounted YAML
    assert "TRIVY_GATEWAY_DATA_DIR" not in env
    # the config path is only set because the file is shipped at that path
    copies = [shlex.split(r) for w, r in final_stage() if w == "COPY"]
    copied = {c[-1]: c[-2] for c in copies if not any(a.startswith("--from") for a in c)}
    assert copied[env["TRIVY_GATEWAY_CONFIG"]] == "config/gateway.yaml"
    # listen addresses are not forced by env (env would override a mounted config file)
    assert "TRIVY_GATEWAY_LISTEN" not in env and "TRIVY_GATEWAY_ADMIN_LISTEN" not in env


def test_image_config_keeps_state_in_the_volume_and_a_mounted_yaml_wins(tmp_path):
    """Run the image's RUN sed for real on the shipped file: data_dir becomes /data; a mounted
    file's server.data_dir is not overridden by anything the image sets."""
    shipped = tmp_path / "gateway.yaml"
    shipped.write_text((ROOT / "config/gateway.yaml").read_text())
    (run,) = [r for w, r in final_stage() if w == "RUN" and "data_dir" in r]
    script = run.replace(dockerfile_env()["TRIVY_GATEWAY_CONFIG"], str(shipped))
    subprocess.run(["sh", "-c", script], check=True)
    image_env = {k: v for k, v in dockerfile_env().items() if k.startswith("TRIVY_GATEWAY_")}
    image_env["TRIVY_GATEWAY_CONFIG"] = str(shipped)
    assert load_settings(env=image_env).server.data_dir == "/data"
    mounted = tmp_path / "mine.yaml"
    mounted.write_text("server: {data_dir: /srv/gateway}\n")
    image_env["TRIVY_GATEWAY_CONFIG"] = str(mounted)
    assert load_settings(env=image_env).server.data_dir == "/srv/gateway"


def test_dockerfile_copy_sources_exist_and_are_not_ignored():
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    for word, rest in dockerfile_instructions():
        if word != "COPY":
            continue
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        if "--from" in rest:
            continue
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            top = src.split("/")[0]
            assert top not in ignored and src not in ignored, f"COPY {src} is excluded by .dockerignore"
    for needed in ("gateway", "config", "pyproject.toml", "README.md"):
        assert needed not in ignored


def test_shipped_config_is_valid(tmp_path):
    settings = load_settings(str(ROOT / "config/gateway.yaml"), env={})
    assert settings.server.listen_addr[1] == PROXY_PORT
    assert settings.server.admin_addr[1] == ADMIN_PORT


def healthcheck_argv() -> list[str]:
    hc = [r for w, r in final_stage() if w == "HEALTHCHECK"]
    assert hc, "no HEALTHCHECK"
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", hc[-1])
    assert m, "HEALTHCHECK must use the exec form"
    argv = json.loads(m.group(1))
    assert argv == ["trivy-gateway", "healthcheck"], "the healthcheck reads the effective config"
    return [sys.executable, "-m", "gateway", *argv[1:]]


async def test_dockerfile_healthcheck_runs_against_a_real_admin_server(tmp_path):
    from gateway.admin import AdminServer

    argv = healthcheck_argv()
    server = AdminServer(Metrics(), dict, lambda: True, lambda: b"", "127.0.0.1", 0)
    await server.start()
    # the admin port moved in a mounted YAML (not in env): the check follows it
    mounted = tmp_path / "gateway.yaml"
    mounted.write_text(f"server: {{admin_listen: '0.0.0.0:{server.port}'}}\n")
    try:
        env = dict(os.environ, TRIVY_GATEWAY_CONFIG=str(mounted),
                   HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
        env.pop("TRIVY_GATEWAY_ADMIN_LISTEN", None)
        proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=str(ROOT),
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        port = server.port
    finally:
        await server.close()
    # and it fails when nothing answers
    proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=str(ROOT),
                                                stderr=asyncio.subprocess.PIPE)
    await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0


# =============================================================================================
# Compose
# =============================================================================================

def compose() -> dict:
    return load_yaml(COMPOSE)


def parse_mount(spec) -> tuple[str, str, bool]:
    if isinstance(spec, dict):
        return spec["source"], spec["target"], bool(spec.get("read_only"))
    parts = spec.split(":")
    return parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")


def command_text(cmd) -> str:
    return " ".join(shlex.quote(c) for c in cmd) if isinstance(cmd, list) else str(cmd)


def service_commands(svc: dict) -> list[str]:
    cmds = []
    cmd = svc.get("command")
    if isinstance(cmd, list) and cmd[:2] == ["sh", "-c"]:
        cmds.append(cmd[2])
    elif cmd is not None:
        cmds.append(command_text(cmd))
    return cmds


def test_compose_services_restart_and_depend_on_health():
    services = compose()["services"]
    assert {"gateway", "trivy", "prometheus", "grafana"} <= set(services)
    one_shot = {dep for s in services.values() for dep, cond in (s.get("depends_on") or {}).items()
                if isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully"}
    for name, svc in services.items():
        if name in one_shot:
            assert svc.get("restart") == "no", name
        else:
            assert svc.get("restart") == "unless-stopped", name
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must name conditions"
        for dep, cond in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep] or dep == "gateway", (name, dep)
    assert services["trivy"]["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_compose_gateway_ports_env_data_and_cli():
    services = compose()["services"]
    gw = services["gateway"]
    published = {int(p.split(":")[-1]) for p in gw["ports"]}
    assert published == {PROXY_PORT, ADMIN_PORT}
    env = gw["environment"]
    for name in env:
        if name.startswith("TRIVY_GATEWAY_"):
            assert name in GATEWAY_ENV, name
    data_dir = env.get("TRIVY_GATEWAY_DATA_DIR", "/data")
    mounts = {parse_mount(v)[1]: parse_mount(v)[0] for v in gw["volumes"]}
    assert mounts[data_dir] in compose()["volumes"]
    hc = " ".join(gw["healthcheck"]["test"])
    assert f"127.0.0.1:{ADMIN_PORT}/readyz" in hc or f"127.0.0.1:{ADMIN_PORT}/healthz" in hc
    for name, svc in services.items():
        for cmd in service_commands(svc):
            for argv in cli_invocations(cmd):
                assert_cli_accepts(argv, f"compose service {name}")
        for key in (svc.get("environment") or {}):
            if key.startswith("TRIVY_GATEWAY_"):
                assert key in GATEWAY_ENV, (name, key)


def test_compose_trivy_uses_gateway_and_trusts_its_ca():
    services = compose()["services"]
    trivy = services["trivy"]
    assert trivy["image"].startswith("aquasec/trivy")
    cmd = trivy["command"]
    assert cmd[:3] == ["server", "--listen", ":8080"]
    assert cmd[3] == "--token" and cmd[4].startswith("${TRIVY_TOKEN")
    env = trivy["environment"]
    assert env["HTTPS_PROXY"] == f"http://gateway:{PROXY_PORT}"
    cert = PurePosixPath(env["SSL_CERT_FILE"])
    mounts = {parse_mount(v)[1]: parse_mount(v) for v in trivy["volumes"]}
    source, target, read_only = mounts[str(cert.parent)]
    assert read_only, "the CA volume must be mounted read-only into the Trivy container"
    # some service writes that file with `trivy-gateway ca bundle` into the same volume,
    # from a data dir that is the gateway's own data volume
    gw_data = {parse_mount(v)[1]: parse_mount(v)[0] for v in services["gateway"]["volumes"]}["/data"]
    writers = []
    for name, svc in services.items():
        svc_mounts = {parse_mount(v)[0]: parse_mount(v)[1] for v in svc.get("volumes", [])}
        if source not in svc_mounts:
            continue
        for cmd in service_commands(svc):
            m = re.search(r"trivy-gateway ca bundle(?: --data-dir (\S+))? > (\S+)", cmd)
            if m:
                data_dir = m.group(1) or "/data"
                assert svc_mounts.get(gw_data) == data_dir, "bundle made from another CA"
                out = PurePosixPath(m.group(2))
                final = re.search(rf"mv {re.escape(str(out))} (\S+)", cmd)
                out = PurePosixPath(final.group(1)) if final else out
                assert out.parent == PurePosixPath(svc_mounts[source])
                assert out.name == cert.name
                writers.append(name)
    assert writers, "nothing writes the CA bundle the Trivy server trusts"
    # the key never reaches the Trivy container
    assert gw_data not in {parse_mount(v)[0] for v in trivy["volumes"]}


def test_compose_bind_mounts_exist():
    for name, svc in compose()["services"].items():
        for v in svc.get("volumes", []):
            source = parse_mount(v)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
        build = svc.get("build")
        if build:
            ctx = (DEPLOY / build["context"]).resolve()
            assert (ctx / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE.resolve()


def test_dependency_track_override():
    dt = load_yaml(DEPLOY / "dependency-track/docker-compose.yml")
    services = compose()["services"]
    for name, svc in dt["services"].items():
        assert svc.get("restart") == "unless-stopped", name
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in dt["services"] or dep in services, (name, dep)
    readme = (DEPLOY / "dependency-track/README.md").read_text("utf-8")
    assert "http://trivy:8080" in readme and "TRIVY_TOKEN" in readme
    assert '"trivy.base.url"' in readme and '"trivy.api.token"' in readme


# =============================================================================================
# Kubernetes
# =============================================================================================

def k8s_objects() -> dict[tuple[str, str], dict]:
    objs = {}
    kust = load_yaml(K8S / "kustomization.yaml")
    for rel in kust["resources"] + ["secret-ca.yaml"]:
        path = K8S / rel
        assert path.is_file(), rel
        for doc in yaml_docs(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), rel
            objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def k8s_kind(kind: str) -> dict:
    (obj,) = [o for (k, _), o in k8s_objects().items() if k == kind]
    return obj


def test_k8s_has_every_required_kind():
    kinds = {k for k, _ in k8s_objects()}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Secret", "ConfigMap",
            "ServiceMonitor", "PodDisruptionBudget", "PrometheusRule"} <= kinds
    kust = load_yaml(K8S / "kustomization.yaml")
    assert "secret-ca.yaml" not in kust["resources"], "the CA Secret is the operator's"


def test_k8s_deployment_probes_ports_security():
    dep = k8s_kind("Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"proxy": PROXY_PORT, "admin": ADMIN_PORT, "mirror": MIRROR_PORT}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc.get("readOnlyRootFilesystem") is True
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert_cli_accepts((c.get("command") or c["args"])[1:] if (c.get("command") or c["args"])[0] == "trivy-gateway"
                       else c["args"], "k8s Deployment")
    for e in c["env"]:
        if e["name"].startswith("TRIVY_GATEWAY_"):
            assert e["name"] in GATEWAY_ENV, e["name"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > ServerSettings().drain_grace


def test_k8s_volumes_config_and_ca_wiring(tmp_path):
    objs = k8s_objects()
    dep = k8s_kind("Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}

    # data dir on the PVC
    data_dir = env["TRIVY_GATEWAY_DATA_DIR"]
    pvc_name = volumes[mounts[data_dir]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", pvc_name) in objs

    # config file from the ConfigMap, and it is a valid gateway config
    cfg_path = PurePosixPath(env["TRIVY_GATEWAY_CONFIG"])
    cm_name = volumes[mounts[str(cfg_path.parent)]]["configMap"]["name"]
    cm = objs[("ConfigMap", cm_name)]
    text = cm["data"][cfg_path.name]
    config = yaml.safe_load(text)
    assert config["server"]["data_dir"] == data_dir
    local = tmp_path / "gateway.yaml"
    local.write_text(text)
    settings = load_settings(str(local), env={})
    assert settings.server.listen_addr[1] == PROXY_PORT

    # tls.ca_cert / tls.ca_key are files of the CA Secret, mounted where the config says
    ca_cert, ca_key = PurePosixPath(settings.tls.ca_cert), PurePosixPath(settings.tls.ca_key)
    assert ca_cert.parent == ca_key.parent
    secret_name = volumes[mounts[str(ca_cert.parent)]]["secret"]["secretName"]
    secret = objs[("Secret", secret_name)]
    assert {ca_cert.name, ca_key.name} <= set(secret.get("stringData", secret.get("data", {})))

    # anything writable that is not the PVC is an emptyDir (read-only root filesystem)
    for path, name in mounts.items():
        v = volumes[name]
        assert set(v) & {"persistentVolumeClaim", "configMap", "secret", "emptyDir"}, name


def test_k8s_service_monitor_pdb_selectors():
    objs = k8s_objects()
    dep = k8s_kind("Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = k8s_kind("Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"] for p in c["ports"]}
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert {p["port"] for p in svc_ports.values()} == {PROXY_PORT, ADMIN_PORT, MIRROR_PORT}
    for p in svc_ports.values():
        assert p["targetPort"] in container_ports
    sm = k8s_kind("ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in svc_ports and svc_ports[ep["port"]]["port"] == ADMIN_PORT
    assert ep["path"] == "/metrics"
    pdb = k8s_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert ("Namespace", load_yaml(K8S / "kustomization.yaml")["namespace"]) in objs


def test_trivy_operator_values():
    values = load_yaml(K8S / "trivy-operator-values.yaml")
    svc = k8s_kind("Service")
    ns = load_yaml(K8S / "kustomization.yaml")["namespace"]
    expected = f"http://{svc['metadata']['name']}.{ns}.svc.cluster.local:{PROXY_PORT}"
    assert values["trivy"]["httpsProxy"] == expected
    assert values["operator"]["httpsProxy"] == expected
    cert_dir = values["trivy"]["sslCertDir"]
    (mount,) = values["trivyOperator"]["scanJobCustomVolumesMount"]
    assert mount["mountPath"] == cert_dir and mount["readOnly"] is True
    vols = {v["name"]: v for v in values["trivyOperator"]["scanJobCustomVolumes"]}
    assert "configMap" in vols[mount["name"]]  # the certificate only, never the key Secret
    assert values["trivy"]["noProxy"]
    env = {e["name"]: e["value"] for e in values["extraEnv"]}
    assert env["SSL_CERT_DIR"] == cert_dir


# =============================================================================================
# systemd
# =============================================================================================

def unit_sections() -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in UNIT.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        assert current, f"line outside a section: {raw}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def test_systemd_unit():
    sections = unit_sections()
    assert set(sections) == {"Unit", "Service", "Install"}
    service = dict(sections["Service"])  # last value wins, as in systemd (for single-value keys)
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes"}.items():
        assert service.get(key) == value, key
    assert service["CapabilityBoundingSet"] == ""
    env = dict(v.split("=", 1) for k, v in sections["Service"] if k == "Environment")
    for name in env:
        assert name in GATEWAY_ENV, name
    state = service["StateDirectory"]
    assert env["TRIVY_GATEWAY_DATA_DIR"] == f"/var/lib/{state}"
    assert PurePosixPath(env["TRIVY_GATEWAY_CONFIG"]).parent == PurePosixPath(
        "/etc/" + service["ConfigurationDirectory"])
    exec_start = cli_invocations(service["ExecStart"])
    assert exec_start and exec_start[0][0] == "serve"
    for key, value in sections["Service"]:
        if key.startswith("Exec"):
            for argv in cli_invocations(value.lstrip("-@+!")):
                assert_cli_accepts(argv, f"systemd {key}")
    drain = ServerSettings().drain_grace
    assert int(service["TimeoutStopSec"]) > drain
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"
    # the install steps in the header use real CLI commands too
    header = UNIT.read_text("utf-8").split("[Unit]")[0]
    calls = command_lines([line.lstrip("# ") for line in header.splitlines()])
    assert calls, "the header shows how to get the CA with the CLI"
    for argv in calls:
        assert_cli_accepts(argv, "systemd unit header")


@pytest.mark.skipif(not Path("/usr/bin/systemd-analyze").exists(), reason="no systemd-analyze")
def test_systemd_analyze_verify_and_security(tmp_path):
    """systemd's own parser: unknown keys or bad values are reported as warnings on stderr."""
    unit = tmp_path / "trivy-gateway.service"
    text = UNIT.read_text("utf-8").replace("/opt/trivy-gateway/bin/trivy-gateway", "/bin/true")
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    problems = [l for l in proc.stderr.splitlines()
                if "Unknown key" in l or "Failed to parse" in l or "Invalid" in l
                or "unknown lvalue" in l.lower()]
    assert not problems, proc.stderr
    # and the hardening holds: systemd's exposure score (0 = locked down, 10 = unprotected)
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=25",
                           "--no-pager", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr


def test_env_names_in_every_artifact_exist():
    """Any TRIVY_GATEWAY_* name anywhere under deploy/, in the Dockerfile or in docs/ is real."""
    pattern = re.compile(r"\bTRIVY_GATEWAY_[A-Z_]+\b")
    allowed_extra = {"TRIVY_GATEWAY_CA", "TRIVY_GATEWAY_SKIP_BROWSER", "TRIVY_GATEWAY_CHROMIUM",
                     "TRIVY_GATEWAY_SCREENSHOT_DIR", "TRIVY_GATEWAY_CACHE_MAX_SIZE"}
    files = [DOCKERFILE, *[p for p in DEPLOY.rglob("*") if p.is_file()],
             *(ROOT / "docs").glob("*.md")]
    for path in files:
        for name in set(pattern.findall(path.read_text("utf-8"))):
            assert name in GATEWAY_ENV or name in allowed_extra, f"{path}: {name}"


def test_settings_dataclass_paths_used_in_docs_exist():
    """Config keys written as `section.key` in the deploy READMEs and docs/ exist in Settings."""
    from gateway.settings import Settings

    def has(path: str) -> bool:
        obj = Settings()
        for part in path.split("."):
            if dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
                obj = getattr(obj, part)
            elif isinstance(obj, dict):
                return True  # free-form mapping (limits.<host>, max_stale.<kind>)
            else:
                return False
        return True

    sections = {f.name for f in dataclasses.fields(Settings)} - {"source"}
    pattern = re.compile(r"`((?:%s)\.[a-z_.]+[a-z_])`" % "|".join(sorted(sections)))
    files = [*(ROOT / "docs").glob("*.md"), *DEPLOY.rglob("*.md"), *DEPLOY.rglob("*.yml")]
    for path in files:
        for key in set(pattern.findall(path.read_text("utf-8"))) - {"tls.crt", "tls.key"}:
            assert has(key), f"{path.relative_to(ROOT)} mentions `{key}`, not a setting"
