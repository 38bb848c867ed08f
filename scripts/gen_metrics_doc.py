#!/usr/bin/env python3
"""Generate docs/metrics.md from the metrics catalogue in gateway/observability/metrics.py.

    python scripts/gen_metrics_doc.py           # rewrite docs/metrics.md
    python scripts/gen_metrics_doc.py --check   # exit 1 if docs/metrics.md is out of date

The catalogue (:func:`gateway.observability.metrics.catalogue`) is the single source of truth;
tests/test_docs_metrics.py regenerates the document and fails when the committed copy differs.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.observability import metrics as M  # noqa: E402

OUTPUT = ROOT / "docs" / "metrics.md"

SECTIONS = (
    ("Proxy (client side)", lambda n: not any(s in n for s in ("upstream_", "cache_", "tls_",
                                                                 "served_bytes", "artifact_"))),
    ("TLS interception", lambda n: "_tls_" in n),
    ("Cache", lambda n: any(s in n for s in ("_cache_", "served_bytes", "artifact_"))),
    ("Upstream client", lambda n: "_upstream_" in n),
)

#: bounded label values worth listing (where the code enumerates them)
LABEL_VALUES = {
    "artifact": ", ".join(f"`{a}`" for a in M.ARTIFACTS),
    "result": ", ".join(f"`{r}`" for r in M.CACHE_RESULTS),
    "source": "`cache`, `upstream`",
    "host": "hosts named in the configuration (policy rules, upstream limits, overrides, "
            "registries); an upstream on a non-default port is `host:port` "
            "(`registry.corp:5000`); every other host is folded into `other`",
    "from_host": "as `host`",
    "to_host": "as `host`",
    "decision": "`intercept`, `tunnel`, `deny`; `mirror` for requests the mirror door served, "
                "`none` for requests refused before any decision (malformed)",
    "door": "`proxy` (HTTPS_PROXY clients), `mirror` (registry / Maven / VEX mirror clients)",
    "kind": "for `trivy_gateway_cache_requests_total` and "
            "`trivy_gateway_prefetch_cache_requests_total`: `oci_blob`, `oci_manifest`, `oci_auth`, "
            "`maven`, `github`, `generic`; for `trivy_gateway_active_connections`: `client`, "
            "`intercepted`, `tunnel`, `mirror`",
    "direction": "`upstream`, `downstream`",
    "status": "HTTP status code as text, or `error` when no response was received",
    "reason": "a short fixed keyword per metric (see the meaning column)",
    "type": "kind of cached object (blobs, response entries)",
}

HOW_TO_USE = """\
## How to use

All examples assume the default scrape job name `trivy-gateway` (see
`deploy/prometheus/prometheus.yml`); drop the `job` matcher if you scrape differently.

**Hit ratio** (share of cacheable client requests the gateway answered without a full upstream
download: hits, stale serves, coalesced followers, negative hits and 304 revalidations, against
those plus misses; the same definition as `hit_ratio` on the status page). Clients only: the
prefetcher's requests (new generations fetched before anyone asks, hourly revalidations of
watched tags) are counted in `trivy_gateway_prefetch_cache_requests_total`, so an idle gateway
shows no misses here:

```promql
sum(rate(trivy_gateway_cache_requests_total{result=~"hit|stale|coalesced|negative|revalidated"}[1h]))
/
sum(rate(trivy_gateway_cache_requests_total{result=~"hit|stale|coalesced|negative|revalidated|miss"}[1h]))
```

**Prefetch activity** (the prefetcher's requests through the cache by result: `miss` fetched
from upstream before any client asked, `revalidated` a watched tag checked unchanged):

```promql
sum by (result) (rate(trivy_gateway_prefetch_cache_requests_total[1h]))
```

**Bytes saved** (bytes served from the cache instead of the internet, per day, and as a share):

```promql
sum(increase(trivy_gateway_served_bytes_total{source="cache"}[1d]))

sum(rate(trivy_gateway_served_bytes_total{source="cache"}[1h]))
/
sum(rate(trivy_gateway_served_bytes_total[1h]))
```

**Age of the vulnerability DB being served**, by its own `UpdatedAt` (kept current by the
prefetcher; Trivy publishes every 6 h, and `TrivyGatewayVulnerabilityDBStale` fires past 24 h),
and the time since the gateway last got it fresh from upstream (grows while stale content hides
an upstream outage):

```promql
max(trivy_gateway_artifact_served_age_seconds{artifact="vulnerability_db"}) / 3600
max(trivy_gateway_artifact_age_seconds{artifact="vulnerability_db"}) / 3600
```

**Upstream pressure**: 429s per host, and hosts whose circuit is open (2) or half-open (1):

```promql
sum by (host) (rate(trivy_gateway_upstream_responses_total{status="429"}[5m]))
max by (host) (trivy_gateway_upstream_circuit_state) > 0
```

**Latency**: 95th percentile of client requests and of upstream response heads:

```promql
histogram_quantile(0.95, sum by (le) (rate(trivy_gateway_request_duration_seconds_bucket[5m])))
histogram_quantile(0.95, sum by (le, host) (rate(trivy_gateway_upstream_request_duration_seconds_bucket[5m])))
```

**Cache disk against its budget**:

```promql
trivy_gateway_cache_size_bytes / trivy_gateway_cache_max_size_bytes
```

The alert rules in `deploy/prometheus/alerts.yml` and the Grafana dashboard in
`deploy/grafana/dashboards/trivy-gateway.json` use only the metrics listed above (a test checks
this); `docs/dashboard.md` explains how to read them.
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _series(name: str, kind: str) -> str:
    if kind == "histogram":
        return f"`{name}_bucket`, `{name}_sum`, `{name}_count`"
    return f"`{name}`"


def render() -> str:
    cat = M.catalogue()
    out = [
        "# Metrics",
        "",
        "<!-- Generated by scripts/gen_metrics_doc.py from gateway/observability/metrics.py. "
        "Do not edit by hand; run `python scripts/gen_metrics_doc.py`. -->",
        "",
        "The gateway exports Prometheus metrics on the admin port (default `:9128`) at `/metrics`.",
        f"Every name starts with `{M.PREFIX}`; counters end in `_total`, durations are in seconds",
        "and sizes in bytes. Label sets are bounded: hosts that are not named in the configuration",
        "are folded into `host=\"other\"`, and no URL, path or digest is ever a label value.",
        "",
        f"{len(cat)} metrics in {len(SECTIONS)} groups.",
        "",
    ]
    used: set[str] = set()
    for title, match in SECTIONS:
        names = [n for n in cat if match(n) and n not in used]
        if not names:
            continue
        out += [f"## {title}", "", "| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
        for name in names:
            info = cat[name]
            labels = ", ".join(f"`{label}`" for label in info["labels"]) or "\u2014"
            series = _series(name, info["type"])
            out.append(f"| {series} | {info['type']} | {labels} | {_cell(info['help'])} |")
            used.add(name)
        out.append("")
    leftover = [n for n in cat if n not in used]
    if leftover:  # pragma: no cover - every name matches a section today
        raise SystemExit(f"metrics without a section: {leftover}")

    out += ["## Label values", "", "| Label | Values |", "|---|---|"]
    all_labels = sorted({label for info in cat.values() for label in info["labels"]})
    for label in all_labels:
        out.append(f"| `{label}` | {_cell(LABEL_VALUES.get(label, 'free-form but bounded'))} |")
    out += ["", "Circuit states (`trivy_gateway_upstream_circuit_state`): "
            + ", ".join(f"{v} = {k.replace('_', '-')}" for k, v in M.CIRCUIT_STATES.items())
            + ".", ""]
    out.append(HOW_TO_USE)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the file is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    current = args.output.read_text("utf-8") if args.output.exists() else ""
    if args.check:
        if current != text:
            sys.stdout.writelines(difflib.unified_diff(
                current.splitlines(True), text.splitlines(True),
                str(args.output), "generated"))
            print(f"\n{args.output} is out of date: run python scripts/gen_metrics_doc.py",
                  file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, "utf-8")
    print(f"wrote {args.output} ({len(M.catalogue())} metrics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
