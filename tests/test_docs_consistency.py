"""docs/ and the deploy READMEs say only true things about the code: links resolve, every
`trivy-gateway …` command they show parses with the real CLI, every metric they name exists."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.observability.metrics import catalogue

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([*(ROOT / "docs").glob("*.md"), *(ROOT / "deploy").rglob("*.md")])
REQUIRED = ("metrics.md", "trust-the-ca.md", "dashboard.md", "air-gapped.md")


def ids(p: Path) -> str:
    return str(p.relative_to(ROOT))


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def test_required_docs_exist():
    for name in REQUIRED:
        assert (ROOT / "docs" / name).is_file(), name


@pytest.mark.parametrize("path", DOCS, ids=ids)
def test_relative_links_resolve(path):
    text = path.read_text("utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file_part = target.split("#")[0]
        assert (path.parent / file_part).exists(), f"{ids(path)}: broken link {target}"


@pytest.mark.parametrize("path", DOCS, ids=ids)
def test_cli_commands_in_code_blocks_parse(path):
    parser = build_parser()
    for block in code_blocks(path.read_text("utf-8")):
        block = re.sub(r"\\\n", " ", block)
        for line in block.splitlines():
            line = line.strip()
            for m in re.finditer(r"(?:^|[\s;&|(])((?:\S*/bin/)?trivy-gateway)\s+([^|;&>#]*)", line):
                words = shlex.split(m.group(2))
                if not words or words[0].startswith(("ca/", "data")):
                    continue  # a path such as ./trivy-gateway-data, not the command
                if words[0] not in ("serve", "ca", "cache", "check-config", "reload", "healthcheck",
                                    "bundle") and \
                        not words[0].startswith("-"):
                    continue  # e.g. "trivy-gateway.internal.example" host names
                try:
                    parser.parse_args(words)
                except SystemExit as exc:
                    raise AssertionError(f"{ids(path)}: `trivy-gateway {' '.join(words)}` "
                                         "does not parse") from exc


@pytest.mark.parametrize("path", DOCS, ids=ids)
def test_metric_names_exist(path):
    names = set(catalogue())
    series = set(names)
    for name, info in catalogue().items():
        if info["type"] == "histogram":
            series.update(name + s for s in ("_bucket", "_sum", "_count"))
    for found in set(re.findall(r"\btrivy_gateway_[a-z0-9_]+", path.read_text("utf-8"))):
        if found == "trivy_gateway_":
            continue
        assert found in series, f"{ids(path)} names {found}, which the gateway does not export"


def test_alerts_named_in_docs_exist():
    import yaml

    rules = {r["alert"] for g in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml")
                                                 .read_text())["groups"] for r in g["rules"]}
    for path in DOCS:
        for name in set(re.findall(r"\bTrivyGateway[A-Za-z0-9]+", path.read_text("utf-8"))):
            assert name in rules, f"{ids(path)} names alert {name}"
    dashboard_doc = (ROOT / "docs/dashboard.md").read_text("utf-8")
    for rule in rules:
        assert rule in dashboard_doc, f"docs/dashboard.md does not explain {rule}"


def test_trust_doc_covers_every_client():
    text = (ROOT / "docs/trust-the-ca.md").read_text("utf-8")
    for needle in ("SSL_CERT_FILE", "SSL_CERT_DIR", "--cacert", "trivy-operator",
                   "Harbor", "GitHub Actions", "GitLab", "trivy.sslCertDir", "trivy.httpsProxy"):
        assert needle in text, needle


def test_air_gapped_doc_names_real_settings():
    from gateway.settings import CacheSettings

    text = (ROOT / "docs/air-gapped.md").read_text("utf-8")
    assert "max_stale" in text and hasattr(CacheSettings(), "max_stale")
    for kind in ("oci", "maven", "github", "generic"):
        assert f"`{kind}`" in text
