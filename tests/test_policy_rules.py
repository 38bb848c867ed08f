"""Policy decisions and the SSRF guard, as tables (pure functions, no I/O)."""
from __future__ import annotations

import pytest

from gateway.policy import Policy, address_category, normalize_host
from gateway.settings import PolicySettings, RuleSettings, load_settings


def policy(*rules: dict, allow_plain_http: bool = True) -> Policy:
    return Policy(PolicySettings(rules=tuple(RuleSettings(**r) for r in rules),
                                 allow_plain_http=allow_plain_http))


P = policy(
    {"host": "ghcr.io", "action": "intercept"},
    {"host": "check.trivy.dev", "action": "deny", "reason": "telemetry off (policy.rules: check.trivy.dev)"},
    {"host": "*.blind.example", "action": "tunnel"},
    {"host": "*.mirror.example", "action": "intercept", "ports": [443, 8443]},
    {"host": "internal.example", "action": "intercept"},
    {"host": "10.0.0.5", "action": "intercept"},
    {"host": "::1", "action": "tunnel"},
    {"host": "*.private-ok.example", "action": "intercept", "allow_private": True},
)


@pytest.mark.parametrize("host,port,plain,action,code,rule,exact", [
    ("ghcr.io", 443, False, "intercept", "", 0, True),
    ("GHCR.IO.", 443, False, "intercept", "", 0, True),          # case + trailing dot
    ("ghcr.io", 80, True, "intercept", "", 0, True),             # HTTP_PROXY: port 80 allowed
    ("ghcr.io", 80, False, "deny", "port", 0, True),             # CONNECT to :80 is not
    ("ghcr.io", 8443, False, "deny", "port", 0, True),
    ("evil-ghcr.io", 443, False, "deny", "not_allowed", None, False),
    ("check.trivy.dev", 443, False, "deny", "rule", 1, True),
    ("a.blind.example", 443, False, "tunnel", "", 2, False),
    ("a.b.blind.example", 443, False, "tunnel", "", 2, False),
    ("blind.example", 443, False, "deny", "not_allowed", None, False),   # apex not matched
    ("xblind.example", 443, False, "deny", "not_allowed", None, False),
    ("eu.mirror.example", 8443, False, "intercept", "", 3, False),
    ("eu.mirror.example", 9443, False, "deny", "port", 3, False),
    ("10.0.0.5", 443, False, "intercept", "", 5, True),           # IP named by a rule
    ("10.0.0.6", 443, False, "deny", "ssrf", None, False),        # other IP literal
    ("127.0.0.1", 443, False, "deny", "ssrf", None, False),
    ("169.254.169.254", 443, False, "deny", "ssrf", None, False),
    ("[::1]", 443, False, "tunnel", "", 6, True),
    ("0:0:0:0:0:0:0:1", 443, False, "tunnel", "", 6, True),      # canonical IPv6 comparison
    ("unknown.test", 443, False, "deny", "not_allowed", None, False),
])
def test_decide_table(host, port, plain, action, code, rule, exact):
    d = P.decide(host, port, plain_http=plain)
    assert (d.action, d.reason_code, d.rule_index, d.exact) == (action, code, rule, exact), d
    assert d.allowed == (action != "deny")
    assert d.reason


def test_reason_texts_name_host_and_config_key():
    d = P.decide("registry.example.test", 443)
    assert d.reason == "registry.example.test is not on the gateway allowlist (policy.rules)"
    assert P.decide("check.trivy.dev", 443).reason == "telemetry off (policy.rules: check.trivy.dev)"
    assert "policy.rules[0].ports" in P.decide("ghcr.io", 8443).reason
    assert "IP address" in P.decide("10.9.9.9", 443).reason


def test_first_match_wins_and_catch_all():
    p = policy({"host": "bad.example", "action": "deny"}, {"host": "*", "action": "tunnel"})
    assert p.decide("bad.example", 443).action == "deny"
    assert p.decide("anything.else", 443).action == "tunnel"
    assert p.decide("anything.else", 443).exact is False
    # the catch-all never admits an IP literal
    assert p.decide("192.0.2.10", 443).reason_code == "ssrf"


def test_plain_http_can_be_switched_off():
    p = policy({"host": "ghcr.io"}, allow_plain_http=False)
    d = p.decide("ghcr.io", 80, plain_http=True)
    assert (d.action, d.reason_code) == ("deny", "port")
    assert "allow_plain_http" in d.reason


def test_default_config_intercepts_trivy_hosts_and_denies_version_check():
    p = Policy(load_settings(env={}))
    for host in ("mirror.gcr.io", "ghcr.io", "pkg-containers.githubusercontent.com",
                 "api.github.com", "codeload.github.com", "repo.maven.apache.org", "github.com",
                 "raw.githubusercontent.com", "googlecode.l.googleusercontent.com"):
        assert p.decide(host, 443).action == "intercept", host
    d = p.decide("check.trivy.dev", 443)
    assert (d.action, d.reason_code) == ("deny", "rule")
    assert p.decide("example.com", 443).reason_code == "not_allowed"
    assert "ghcr.io" in p.hosts


@pytest.mark.parametrize("host,ip,allowed", [
    # exact rules connect wherever DNS / the operator's override says (split horizon, mirrors)
    ("internal.example", "10.1.2.3", True),
    ("internal.example", "127.0.0.1", True),
    ("ghcr.io", "140.82.121.33", True),
    # wildcard-only hosts must not reach non-public addresses
    ("a.mirror.example", "93.184.216.34", True),
    ("a.mirror.example", "127.0.0.1", False),
    ("a.mirror.example", "10.0.0.1", False),
    ("a.mirror.example", "192.168.1.1", False),
    ("a.mirror.example", "169.254.169.254", False),
    ("a.mirror.example", "fd00:ec2::254", False),
    ("a.mirror.example", "::1", False),
    ("a.mirror.example", "::ffff:127.0.0.1", False),   # IPv4-mapped loopback
    ("a.mirror.example", "0.0.0.0", False),
    ("a.mirror.example", "224.0.0.1", False),
    ("a.mirror.example", "100.64.0.1", False),          # shared address space
    ("a.mirror.example", "2606:4700::1111", True),
    ("a.blind.example", "127.0.0.1", False),
    # the rule opts in
    ("x.private-ok.example", "10.0.0.1", True),
    ("x.private-ok.example", "169.254.169.254", True),
    # IP-literal rule: connecting to that very address is what was asked for
    ("10.0.0.5", "10.0.0.5", True),
    # IPv6 forms that carry a non-public IPv4 address (or are never global)
    ("a.blind.example", "::127.0.0.1", False),
    ("a.blind.example", "::ffff:169.254.169.254", False),
    ("a.blind.example", "::ffff:0:10.0.0.1", False),
    ("a.blind.example", "64:ff9b:1::a00:1", False),
    ("a.blind.example", "::ffff:8.8.8.8", True),
    # hosts no rule matches (redirect targets) get the catch-all guard
    ("redirect.elsewhere", "8.8.8.8", True),
    ("redirect.elsewhere", "127.0.0.1", False),
    # a host the policy denies is never connected to
    ("check.trivy.dev", "8.8.8.8", False),
])
def test_address_allowed_table(host, ip, allowed):
    reason = P.address_allowed(host, ip)
    assert (reason is None) == allowed, reason


def test_address_refusal_explains_rule_and_fix():
    reason = P.address_allowed("a.mirror.example", "127.0.0.1")
    assert "127.0.0.1" in reason and "loopback" in reason
    assert "'*.mirror.example'" in reason and "allow_private" in reason
    catch_all = policy({"host": "*", "action": "intercept"})
    reason = catch_all.address_allowed("localhost", "127.0.0.1")
    assert "catch-all" in reason
    assert "metadata" in catch_all.address_allowed("metadata.google.internal", "169.254.169.254")


@pytest.mark.parametrize("ip,category", [
    ("8.8.8.8", None), ("127.0.0.53", "loopback"), ("10.1.1.1", "private"),
    ("172.16.0.1", "private"), ("192.168.0.1", "private"), ("169.254.169.254", "metadata"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("fd00:ec2::254", "metadata"), ("fc00::1", "private"), ("::", "unspecified"),
    ("0.0.0.0", "unspecified"), ("ff02::1", "multicast"), ("239.1.1.1", "multicast"),
    ("::ffff:10.0.0.1", "private"), ("64:ff9b::a9fe:a9fe", "metadata"),
    ("2002:7f00:1::1", "loopback"), ("100.100.100.200", "reserved"), ("not-an-ip", "invalid"),
    # IPv4-compatible ::/96 (deprecated): the embedded address, else never global
    ("::127.0.0.1", "loopback"), ("::7f00:1", "loopback"), ("::10.0.0.1", "private"),
    ("::169.254.169.254", "metadata"), ("::8.8.8.8", "reserved"), ("::1", "loopback"),
    # IPv4-mapped ::ffff:0:0/96: judged by the embedded address (a public one is public)
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:7f00:1", "loopback"),
    ("::ffff:169.254.169.254", "metadata"), ("::ffff:8.8.8.8", None),
    ("::ffff:0.0.0.0", "unspecified"),
    # IPv4-translated ::ffff:0:0:0/96 (RFC 2765)
    ("::ffff:0:127.0.0.1", "loopback"), ("::ffff:0:a00:1", "private"),
    ("::ffff:0:8.8.8.8", "reserved"),
    # NAT64: well-known prefix judged by the embedded address; local-use prefix never global
    ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::808:808", None),
    ("64:ff9b:1::7f00:1", "reserved"), ("64:ff9b:1::808:808", "reserved"),
    ("64:ff9b:1:ffff:ffff::1", "reserved"),
])
def test_address_category(ip, category):
    assert address_category(ip) == category


def test_normalize_host():
    assert normalize_host("Ghcr.IO.") == "ghcr.io"
    assert normalize_host("[::1]") == "::1"
    assert normalize_host("0:0::1") == "::1"
