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
    #: resolved at load time from password_env / password_file; never logged, never a YAML key
    password: str = field(default="", metadata=secret("use proxy.auth.password_env or "
                                                      "proxy.auth.password_file"))

    def validate(self, path: str) -> None:
        if self.enabled and not self.username:
            raise ConfigError(f"{path}.username", "required when proxy auth is enabled")

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
    #: time allowed for a client to send a complete request head
    header_timeout: Duration = Duration(30)
    #: request heads larger than this are refused with 431
    max_header_bytes: int = 64 * 1024
    #: chunk size used when relaying bodies
    chunk_size: int = 256 * 1024
    #: client connections open at once; one more is answered 503 + Retry-After and closed
    #: (0: no cap). Each takes a file descriptor (a tunnel two): the gateway raises its soft
    #: RLIMIT_NOFILE towards the hard limit at start and warns when the cap cannot fit in it.
    max_connections: int = 4096

    def validate(self, path: str) -> None:
        at_least(self.max_header_bytes, 4096, f"{path}.max_header_bytes", "4096 bytes")
        at_least(self.chunk_size, 4096, f"{path}.chunk_size", "4096 bytes")
        at_least(self.header_timeout, 0.1, f"{path}.header_timeout", "0.1s")
        at_least(self.idle_timeout, 0.1, f"{path}.idle_timeout", "0.1s")
        if self.max_connections < 0:
            raise ConfigError(f"{path}.max_connections", "must be 0 (no cap) or positive")
