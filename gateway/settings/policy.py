"""Allowlist rules: which CONNECT/request targets are intercepted, tunnelled or denied."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ._parse import ConfigError

ACTIONS = ("intercept", "tunnel", "deny")


@dataclass(frozen=True)
class RuleSettings:
    #: exact host (``ghcr.io``), ``*.suffix`` wildcard, ``*`` catch-all, or an IP literal
    host: str
    action: str = "intercept"
    ports: tuple[int, ...] = (443,)
    #: a wildcard/catch-all match that resolves to a private/loopback/link-local address is
    #: refused (SSRF guard) unless this is true
    allow_private: bool = False
    #: shown to the client when the rule denies
    reason: Optional[str] = None

    def validate(self, path: str) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"{path}.action", f"must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if not self.host or (self.host != "*" and "*" in self.host and not self.host.startswith("*.")):
            raise ConfigError(f"{path}.host", f"expected 'host', '*.suffix' or '*', got {self.host!r}")
        name, sep, port = self.host.rpartition(":")
        if sep and port.isdigit() and (":" not in name or name.endswith("]")):
            # registries are spelt host:port elsewhere; a rule would silently never match
            raise ConfigError(f"{path}.host", f"{self.host!r}: a rule names the host and lists "
                              f"the port apart: host: {name.strip('[]')}, ports: [{port}]")
        for p in self.ports:
            if not 0 < p < 65536:
                raise ConfigError(f"{path}.ports", f"bad port {p}")


@dataclass(frozen=True)
class PolicySettings:
    #: first matching rule wins; no match → deny
    rules: tuple[RuleSettings, ...] = ()
    #: allow plain-HTTP absolute-form requests (HTTP_PROXY) to hosts an intercept rule allows on
    #: port 80. Off: Trivy never uses plain HTTP, and anyone on the path to port 80 can forge what
    #: comes back (the cache keeps it apart from HTTPS content either way: the scheme is in every
    #: key). A rule that lists port 80 in ``ports`` allows it for that host regardless.
    allow_plain_http: bool = False
