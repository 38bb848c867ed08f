"""Allowlist rules and the SSRF guard, as pure functions of the configuration.

Matching (``policy.rules``, first match wins, no match → deny):

* ``ghcr.io`` — exactly that host (case-insensitive, a trailing dot ignored);
* ``*.example.com`` — any name *below* example.com (``a.example.com``, ``a.b.example.com``),
  not ``example.com`` itself (write a second rule for the apex);
* ``*`` — any host name;
* ``10.0.0.5`` / ``::1`` — that IP address. IP-literal targets are only ever allowed by a rule
  naming the address: wildcards and the catch-all never match an IP literal (SSRF guard).

A rule matches a target when its host pattern matches and the port is in its ``ports``. For
plain-HTTP absolute-form requests (``HTTP_PROXY``) an *intercept* rule also matches port 80 when
``policy.allow_plain_http`` is on. A host that matches a rule only on another port is denied with
reason code ``port``.

The SSRF guard (:meth:`Policy.address_allowed`) is applied by the upstream layer to every address
it actually connects to (after DNS or an operator's address override): a host admitted only by a
wildcard or the catch-all must not reach loopback, private, link-local (cloud metadata included),
unspecified, multicast or otherwise non-global addresses unless its rule sets ``allow_private``.
A host named by an exact rule connects wherever DNS or the operator's override says, so
split-horizon DNS and internal mirrors keep working.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional

from ..hostport import IPAddress, normalize_host, parse_ip
from ..settings import PolicySettings, RuleSettings

ACTION_INTERCEPT = "intercept"
ACTION_TUNNEL = "tunnel"
ACTION_DENY = "deny"

#: bounded values of ``Decision.reason_code`` (also the ``reason`` label of trivy_gateway_denied_total)
REASON_CODES = ("not_allowed", "rule", "ssrf", "port")

#: cloud instance metadata endpoints (AWS/GCP/Azure/OpenStack IPv4, AWS IPv6)
METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: IPv6 ranges that carry an IPv4 address in their last 32 bits (besides NAT64 above): the
#: deprecated IPv4-compatible ``::a.b.c.d`` (RFC 4291 §2.5.5.1) and IPv4-translated
#: ``::ffff:0:a.b.c.d`` (RFC 2765). Neither is globally routable: a public embedded address makes
#: them ``reserved``, a non-public one its own category. (IPv4-mapped ``::ffff:a.b.c.d`` is
#: ``IPv6Address.ipv4_mapped``.)
_V4_COMPATIBLE = ipaddress.ip_network("::/96")
_V4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
#: non-global IPv6 ranges Python's ``is_global`` (3.11) misses: local-use NAT64 (RFC 8215)
_NOT_GLOBAL = (ipaddress.ip_network("64:ff9b:1::/48"),)



def _embedded_ipv4(ip: IPAddress) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo client, NAT64)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_category(ip: IPAddress | str) -> Optional[str]:
    """``None`` for a public (globally routable unicast) address, else why it is not.

    One of ``metadata``, ``unspecified``, ``loopback``, ``link-local``, ``multicast``,
    ``private``, ``reserved`` (non-global ranges such as 100.64/10 or documentation prefixes).
    IPv6 addresses that embed an IPv4 address are judged by that address as well.
    """
    parsed = parse_ip(ip)
    if parsed is None:
        return "invalid"
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.is_unspecified or parsed.is_loopback:      # :: and ::1 are in ::/96 too
            return _category(parsed)
        if parsed in _V4_COMPATIBLE or parsed in _V4_TRANSLATED:
            inner = ipaddress.IPv4Address(int(parsed) & 0xFFFFFFFF)
            return _category(inner) or "reserved"
        if any(parsed in net for net in _NOT_GLOBAL):
            return "reserved"
    inner = _embedded_ipv4(parsed)
    return _category(inner) if inner is not None else _category(parsed)


def _category(addr: IPAddress) -> Optional[str]:
    if addr in METADATA_ADDRESSES:
        return "metadata"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_private:
        return "private"
    if not addr.is_global:
        return "reserved"
    return None


@dataclass(frozen=True)
class Decision:
    """What to do with one target. ``reason_code`` is empty unless the action is deny."""

    action: str                       # intercept | tunnel | deny
    host: str
    port: int
    reason: str                       # a sentence for people (403 reason phrase, logs)
    reason_code: str = ""             # not_allowed | rule | ssrf | port  (bounded, for metrics)
    rule: Optional[RuleSettings] = None
    rule_index: Optional[int] = None
    #: True when the matching rule names the host exactly (not a wildcard / catch-all)
    exact: bool = False

    @property
    def allowed(self) -> bool:
        return self.action != ACTION_DENY

    @property
    def rule_key(self) -> str:
        return f"policy.rules[{self.rule_index}]" if self.rule_index is not None else "policy.rules"


class _Rule:
    __slots__ = ("settings", "index", "kind", "value", "ip")

    def __init__(self, settings: RuleSettings, index: int) -> None:
        self.settings = settings
        self.index = index
        pattern = settings.host.strip().lower()
        self.ip: Optional[IPAddress] = None
        if pattern == "*":
            self.kind, self.value = "any", ""
        elif pattern.startswith("*."):
            self.kind, self.value = "suffix", "." + normalize_host(pattern[2:])
        else:
            self.ip = parse_ip(pattern)
            self.kind = "ip" if self.ip is not None else "exact"
            self.value = normalize_host(pattern)

    @property
    def exact(self) -> bool:
        return self.kind in ("exact", "ip")

    def matches_host(self, host: str, ip: Optional[IPAddress]) -> bool:
        if self.kind == "ip":
            return ip is not None and ip == self.ip
        if ip is not None:
            return False            # wildcards and names never admit an IP literal
        if self.kind == "exact":
            return host == self.value
        if self.kind == "suffix":
            return host.endswith(self.value) and len(host) > len(self.value)
        return True                 # "*"


class Policy:
    """First-match-wins allowlist over ``settings.policy.rules`` (or a :class:`PolicySettings`)."""

    def __init__(self, settings) -> None:
        policy: PolicySettings = getattr(settings, "policy", settings)
        self.settings = policy
        self._rules = [_Rule(r, i) for i, r in enumerate(policy.rules)]

    @property
    def hosts(self) -> list[str]:
        """Host names the rules name exactly (bounded metric label values)."""
        return [r.value for r in self._rules if r.exact]

    def _match(self, host: str) -> Optional[_Rule]:
        ip = parse_ip(host)
        for rule in self._rules:
            if rule.matches_host(host, ip):
                return rule
        return None

    def decide(self, host: str, port: int, *, plain_http: bool = False) -> Decision:
        """Decide a CONNECT (``plain_http=False``) or an absolute-form ``http://`` request."""
        host = normalize_host(host)
        ip = parse_ip(host)
        port_miss: Optional[_Rule] = None
        for rule in self._rules:
            if not rule.matches_host(host, ip):
                continue
            s = rule.settings
            port_ok = port in s.ports or (
                plain_http and port == 80 and s.action == ACTION_INTERCEPT
                and self.settings.allow_plain_http)
            if not port_ok:
                port_miss = port_miss or rule
                continue
            if s.action == ACTION_DENY:
                reason = s.reason or (f"{host} is denied by the gateway policy "
                                      f"(policy.rules[{rule.index}])")
                return Decision(ACTION_DENY, host, port, reason, "rule", s, rule.index, rule.exact)
            how = "intercepted" if s.action == ACTION_INTERCEPT else "tunnelled"
            return Decision(s.action, host, port,
                            f"{host} is {how} by policy.rules[{rule.index}] ({s.host})", "", s,
                            rule.index, rule.exact)
        if port_miss is not None:
            s = port_miss.settings
            allowed = ", ".join(str(p) for p in s.ports) or "none"
            if plain_http and port == 80 and s.action == ACTION_INTERCEPT:
                reason = (f"plain HTTP to {host} is not allowed (policy.allow_plain_http is off; "
                          "use HTTPS)")
            else:
                reason = (f"port {port} is not allowed for {host} "
                          f"(policy.rules[{port_miss.index}].ports: {allowed})")
            return Decision(ACTION_DENY, host, port, reason, "port", s, port_miss.index,
                            port_miss.exact)
        if ip is not None:
            return Decision(ACTION_DENY, host, port,
                            f"{host} is an IP address; only addresses a rule names are allowed "
                            "(policy.rules)", "ssrf")
        return Decision(ACTION_DENY, host, port,
                        f"{host} is not on the gateway allowlist (policy.rules)", "not_allowed")

    def address_allowed(self, host: str, ip: IPAddress | str) -> Optional[str]:
        """``None`` when ``host`` may be reached at ``ip``; otherwise the reason it may not.

        Called by the upstream layer for the address it actually connects to. Hosts no rule
        matches (e.g. a redirect target) get the same guard as a catch-all match.
        """
        host = normalize_host(host)
        addr = parse_ip(ip)
        if addr is None:
            return f"{host}: {ip!r} is not an IP address"
        rule = self._match(host)
        if rule is not None and rule.settings.action == ACTION_DENY:
            return (f"{host} is denied by the gateway policy (policy.rules[{rule.index}])")
        if rule is not None and (rule.exact or rule.settings.allow_private):
            return None
        category = address_category(addr)
        if category is None:
            return None
        if rule is None:
            return (f"{host} resolves to {addr} ({category}); hosts outside the allowlist may not "
                    "reach non-public addresses")
        what = "the catch-all rule" if rule.kind == "any" else f"wildcard rule {rule.settings.host!r}"
        return (f"{host} resolves to {addr} ({category}), refused for a host matched only by "
                f"{what} (set allow_private: true on policy.rules[{rule.index}] or add an exact "
                "rule)")
