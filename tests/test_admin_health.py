"""The status page tells the truth: with every upstream refusing, a real gateway reports
"degraded" (page in headless Chromium, /api/status) while /readyz stays ready, lists the hosts
it refused with the rule that would allow them, and the configured upstreams not contacted."""
from __future__ import annotations

import http.client
import json
import re
import time
import urllib.request

from gateway.admin.page import render_status_page
from gateway.health import DenialLog, allow_hint, assess
from gateway.policy import Policy
from gateway.settings import PolicySettings, RuleSettings
from tests.gateway_harness import free_port

try:
    from test_admin_status_page_browser import base_args, browser, run_chromium  # noqa: F401
except ImportError:  # pragma: no cover
    from tests.test_admin_status_page_browser import base_args, browser, run_chromium  # noqa: F401


def _via_proxy(gw, host: str, path: str, headers: dict | None = None) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", gw.proxy_port, context=gw.client_ssl(),
                                       timeout=30)
    conn.set_tunnel(host, 443)
    try:
        conn.request("GET", path, headers=headers or {})
        return conn.getresponse().status
    except OSError as exc:           # CONNECT refused: "Tunnel connection failed: 403 …"
        match = re.search(r"\b(\d{3})\b", str(exc))
        return int(match.group(1)) if match else -1
    finally:
        conn.close()


def _degraded_gateway(make_gateway):
    dead = f"127.0.0.1:{free_port()}"      # nothing listens: every connect is refused
    return make_gateway(extra={"upstream": {"address_overrides": {"mirror.gcr.io": dead,
                                                                  "ghcr.io": dead}}})


async def test_page_in_chromium_shows_degraded_and_denied_host(make_gateway, browser):
    gw = _degraded_gateway(make_gateway)
    assert _via_proxy(gw, "mirror.gcr.io", "/v2/aquasec/trivy-db/manifests/2") >= 500
    assert _via_proxy(gw, "ghcr.io", "/v2/aquasecurity/trivy-db/manifests/2") >= 500
    assert _via_proxy(gw, "evil.example", "/") == 403

    with urllib.request.urlopen(gw.admin_url + "/readyz", timeout=5) as r:
        assert r.status == 200                      # ready ≠ healthy upstreams
    status = gw.status()
    assert status["ready"] is True and status["health"]["state"] == "degraded"
    assert any(r.startswith("mirror.gcr.io:") for r in status["health"]["reasons"])
    assert {e["host"] for e in status["recent_errors"]} == {"mirror.gcr.io", "ghcr.io"}
    (denied,) = status["denied"]
    assert (denied["host"], denied["port"]) == ("evil.example", 443)
    assert denied["allow"] == ("add to policy.rules (before any catch-all): "
                               "{host: evil.example, action: intercept, ports: [443]}")
    assert "repo.maven.apache.org" in status["upstreams_not_contacted"]

    binary, tmp, env = browser
    args = base_args(binary, tmp / "profile-health") + [
        "--virtual-time-budget=3000", "--dump-dom", gw.admin_url + "/"]
    rc, out, err = await run_chromium(args, env)
    assert rc == 0, err.decode(errors="replace")[-2000:]
    dom = out.decode()
    assert re.search(r'<span class="badge state-bad" id="health-state">degraded</span>', dom)
    assert re.search(r'<span class="badge state-ok">ready</span>', dom)
    reasons = re.search(r'<ul id="health-reasons">(.*?)</ul>', dom, re.S).group(1)
    assert "mirror.gcr.io" in reasons and "ghcr.io" in reasons
    row = re.search(r'<tr class="denied" data-host="evil\.example">(.*?)</tr>', dom, re.S)
    assert row and "action: intercept, ports: [443]" in row.group(1)
    assert re.search(r'<tr class="upstream not-contacted" data-host="repo\.maven\.apache\.org">'
                     r'.*?not contacted yet', dom, re.S)
    assert "Next try in" in dom and "Open for" not in dom


def test_healthy_gateway_is_ok_and_page_has_no_degraded_section(make_gateway):
    gw = make_gateway()
    status = gw.status()
    assert status["health"] == {"state": "ok", "reasons": []}
    page = urllib.request.urlopen(gw.admin_url + "/", timeout=5).read().decode()
    assert 'id="health-state">upstreams ok<' in page and 'id="health-section"' not in page
    json.dumps(status)


def test_allow_hints_name_the_rule_to_change():
    policy = Policy(PolicySettings(rules=(
        RuleSettings(host="ghcr.io", ports=(443,)),
        RuleSettings(host="check.trivy.dev", action="deny"),
    )))
    assert allow_hint(policy.decide("ghcr.io", 8443)) == "add 8443 to policy.rules[0].ports"
    assert allow_hint(policy.decide("check.trivy.dev", 443)).startswith("policy.rules[1] denies")
    assert "action: tunnel, ports: [22]" in allow_hint(policy.decide("git.example", 22))


def test_denial_log_is_bounded_and_counts_repeats():
    now = [1000.0]
    log = DenialLog(limit=3, clock=lambda: now[0])
    policy = Policy(PolicySettings(rules=()))
    for host in ("a.example", "b.example", "a.example", "c.example", "d.example"):
        log.record(policy.decide(host, 443))
        now[0] += 1
    snap = log.snapshot()
    assert [d["host"] for d in snap] == ["d.example", "c.example", "a.example"]
    assert snap[2]["count"] == 2


def test_open_circuit_and_stale_artifact_are_reasons_and_shown_first_on_the_page():
    ups = {"ghcr.io": {"circuit": "open", "open_remaining": 27.6, "why": "429"}}
    arts = [{"artifact": "java_db", "reference": "ghcr.io/x:1", "stale": True}]
    health = assess(ups, arts)
    assert health["state"] == "degraded" and len(health["reasons"]) == 2
    assert "next try in 28s" in health["reasons"][0]
    page = render_status_page({"ready": True, "health": health})
    assert page.index('id="health-section"') < page.index('id="traffic"')


def test_artifacts_show_when_their_tag_is_next_checked(clean_upstreams, make_gateway):
    gw = make_gateway(clean_upstreams, {"cache": {"oci": {"tag_ttl": {"mirror.gcr.io/aquasec/trivy-db": "1h"},
                                                          "refresh_ahead": 0.5}}})
    oci = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    assert _via_proxy(gw, "mirror.gcr.io", "/v2/aquasec/trivy-db/manifests/2", oci) == 200
    deadline = time.monotonic() + 10       # noted when the fill is committed, just after
    while not (arts := [a for a in gw.status()["artifacts"]
                        if a["artifact"] == "vulnerability_db"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    (art,) = arts
    assert 1700 < art["next_check_seconds"] <= 1800               # half of the 1h TTL
    page = render_status_page({"artifacts": [dict(art, next_check_seconds=1800.0)]})
    assert '<td class="num next-check"' in page and ">in 30m 0s<" in page
    assert ">due<" in render_status_page({"artifacts": [dict(art, next_check_seconds=-5)]})
