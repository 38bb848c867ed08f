"""Client-facing proxy protocol settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ._parse import ConfigError, Duration, at_least, secret


@dataclass(frozen=True)
class ProxyAuthSettings:
    """Optional ``Proxy-Authorization: Basic`` (Go clients send it for ``http://user:pass@gw:3128``)."""

    enabled: bool = False
    username: str = ""
    #: the password itself is never in the YAML: it comes from this environment variable or file
    password_env: str = "TRIVY_GATEWAY_PROXY_PASSWORD"
    password_file: Optional[str] = None
    realm: str = "trivy-gateway"
    #: wrong credentials from one client address this many times within ``failure_window``
    #: lock that address out for ``lockout`` (429 + Retry-After, credentials not even checked),
    #: so a password cannot be guessed at line rate. 0: no limit. A request without any
    #: credentials (the first leg of a 407 challenge) is not a failure.
    max_failures: int = 10
    failure_window: Duration = Duration(60)
    lockout: Duration = Duration(60)
    #: resolved at load time from password_env / password_file; never logged, never a YAML key
    password: str = field(default="", metadata=secret("use proxy.auth.password_env or "
                                                      "proxy.auth.password_file"))

    def validate(self, path: str) -> None:
        if self.enabled and not self.username:
            raise ConfigError(f"{path}.username", "required when proxy auth is enabled")
        if self.max_failures < 0:
            raise ConfigError(f"{path}.max_failures", "must be 0 (no limit) or positive")
        if self.max_failures and (self.failure_window <= 0 or self.lockout <= 0):
            key = "failure_window" if self.failure_window <= 0 else "lockout"
            raise ConfigError(f"{path}.{key}", "must be positive when max_failures is set")

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return (f"ProxyAuthSettings(enabled={self.enabled}, username={self.username!r}, "
                f"password={'***' if self.password else ''!r})")


@dataclass(frozen=True)
class ProxySettings:
    auth: ProxyAuthSettings = ProxyAuthSettings()
    #: pseudonym used in the Via header we add (RFC 9110 §7.6.3)
    via_pseudonym: str = "trivy-gateway"
    #: a client connection idle this long between requests is closed
    idle_timeout: Duration = Duration(120)
    #: time allowed for a client to send a complete request head; also how long a new
    #: connection (or one just switched to TLS) may stay silent before its first byte
    header_timeout: Duration = Duration(30)
    #: request heads larger than this are refused with 431
    max_header_bytes: int = 64 * 1024
    #: chunk size used when relaying bodies
    chunk_size: int = 256 * 1024
    #: client connections open at once; one more is answered 503 + Retry-After and closed
    #: (0: no cap). Each takes a file descriptor (a tunnel two): the gateway raises its soft
    #: RLIMIT_NOFILE towards the hard limit at start and warns when the cap cannot fit in it.
    max_connections: int = 4096
    #: client connections open at once from one client address; one more is answered 429 +
    #: Retry-After and closed (0: no per-address cap). Keeps one client (or one misbehaving
    #: host) from taking all of ``max_connections``; a CI host running many scans at once
    #: needs a few dozen.
    max_connections_per_client: int = 256

    def validate(self, path: str) -> None:
        at_least(self.max_header_bytes, 4096, f"{path}.max_header_bytes", "4096 bytes")
        at_least(self.chunk_size, 4096, f"{path}.chunk_size", "4096 bytes")
        at_least(self.header_timeout, 0.1, f"{path}.header_timeout", "0.1s")
        at_least(self.idle_timeout, 0.1, f"{path}.idle_timeout", "0.1s")
        if self.max_connections < 0:
            raise ConfigError(f"{path}.max_connections", "must be 0 (no cap) or positive")
        if self.max_connections_per_client < 0:
            raise ConfigError(f"{path}.max_connections_per_client",
                              "must be 0 (no cap) or positive")
