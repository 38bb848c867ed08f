"""How the gateway talks to upstreams: TLS trust, parent proxy, overrides, retries, smoothing."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..hostport import repository_problem
from ._parse import ConfigError, Duration
from ._parse import secret as secret_field


@dataclass(frozen=True)
class RetrySettings:
    #: total tries for an idempotent request (GET/HEAD), first one included
    attempts: int = 4
    #: exponential backoff with full jitter: sleep uniform(0, min(max_delay, base_delay * 2**n))
    base_delay: Duration = Duration(0.5)
    max_delay: Duration = Duration(20)
    #: Retry-After values below this are raised to it (ghcr.io sends "35.852µs")
    retry_after_min: Duration = Duration(1)
    #: Retry-After values above this are not waited for inside a request: the circuit opens instead
    retry_after_max: Duration = Duration(30)
    #: a client request is answered (504) once this much time has passed upstream
    deadline: Duration = Duration(120)
    #: resume a body cut mid-way with Range, at most this many times per fetch
    resume_attempts: int = 3

    def validate(self, path: str) -> None:
        if self.attempts < 1:
            raise ConfigError(f"{path}.attempts", "must be at least 1")


@dataclass(frozen=True)
class HostLimitSettings:
    """Smoothing for one upstream host: token bucket + concurrency cap + bounded queue."""

    #: requests per second (token refill rate)
    rate: float = 20.0
    burst: int = 40
    max_concurrency: int = 16
    #: requests allowed to wait for a token/slot; beyond that the client gets 503 at once
    queue_size: int = 1000
    queue_timeout: Duration = Duration(30)
    #: on 429 the rate is multiplied by this (AIMD), then recovers additively
    backoff_factor: float = 0.5
    #: rate added back per second without 429, up to ``rate``
    recovery_per_second: float = 0.5

    def validate(self, path: str) -> None:
        if self.rate <= 0 or self.burst < 1 or self.max_concurrency < 1:
            raise ConfigError(path, "rate must be > 0, burst and max_concurrency >= 1")
        if not 0 < self.backoff_factor <= 1:
            raise ConfigError(f"{path}.backoff_factor", "must be in (0, 1]")


@dataclass(frozen=True)
class CircuitSettings:
    #: consecutive failures (connect errors, timeouts, 5xx after retries) that open the circuit
    failure_threshold: int = 5
    #: how long a circuit opened by failures stays open before one half-open probe
    open_for: Duration = Duration(30)
    #: a 429/503 whose Retry-After is at least this opens the circuit for the Retry-After window
    long_retry_after: Duration = Duration(60)
    #: upper bound on any open window
    max_open_for: Duration = Duration(3600)


@dataclass(frozen=True)
class CredentialSettings:
    """A credential the gateway injects for one host. Secrets come from env or a file, never YAML."""

    host: str
    #: "bearer" (Authorization: Bearer …; GitHub token) or "basic" (registry / Maven user + password)
    type: str = "bearer"
    username: str = ""
    secret_env: Optional[str] = None
    secret_file: Optional[str] = None
    #: resolved at load time; the file is re-read when it changes (rotated secrets)
    secret: str = field(default="", metadata=secret_field("use secret_env or secret_file"))

    def validate(self, path: str) -> None:
        if self.type not in ("bearer", "basic"):
            raise ConfigError(f"{path}.type", "must be bearer or basic")
        if not (self.secret_env or self.secret_file):
            raise ConfigError(path, "secret_env or secret_file is required")

    def __repr__(self) -> str:
        return f"CredentialSettings(host={self.host!r}, type={self.type!r}, secret=***)"


@dataclass(frozen=True)
class ParentProxySettings:
    #: corporate egress proxy, e.g. http://proxy.corp:8080 ; empty = connect directly
    url: str = ""
    username: str = ""
    password_env: Optional[str] = None
    password: str = field(default="", metadata=secret_field("use password_env"))
    #: hosts reached directly, not through the parent (NO_PROXY style): ``registry.corp``
    #: (that host), ``.corp.example`` or ``*.corp.example`` (that domain and its subdomains)
    no_proxy: tuple[str, ...] = ()

    def validate(self, path: str) -> None:
        for i, entry in enumerate(self.no_proxy):
            name = entry.strip().lower().removeprefix("*")
            if not name.strip(".") or "/" in name or ":" in name or " " in name:
                raise ConfigError(f"{path}.no_proxy[{i}]", f"{entry!r} is not a host name or "
                                  "domain (e.g. registry.corp, .corp.example)")

    def bypasses(self, host: str) -> bool:
        """Is ``host`` reached directly (listed in ``no_proxy``)?"""
        host = host.lower().rstrip(".")
        for entry in self.no_proxy:
            entry = entry.strip().lower().removeprefix("*").rstrip(".")
            if entry.startswith("."):
                if host == entry[1:] or host.endswith(entry):
                    return True
            elif host == entry:
                return True
        return False

    def __repr__(self) -> str:
        return f"ParentProxySettings(url={self.url!r}, username={self.username!r}, password=***)"


@dataclass(frozen=True)
class UpstreamSettings:
    #: extra CA bundle (PEM) trusted for upstream TLS, on top of the system store /
    #: SSL_CERT_FILE / SSL_CERT_DIR. Upstream TLS is always verified.
    ca_bundle: Optional[str] = None
    #: send traffic for a host to another address while keeping Host and SNI
    #: (``ghcr.io: 10.0.0.5:443`` for an internal mirror; tests point hosts at loopback servers)
    address_overrides: dict[str, str] = field(default_factory=dict)
    parent_proxy: ParentProxySettings = ParentProxySettings()
    connect_timeout: Duration = Duration(10)
    #: no byte from the upstream for this long → the read fails (and is retried/resumed)
    read_timeout: Duration = Duration(30)
    #: idle keep-alive connections are closed after this long
    keepalive_timeout: Duration = Duration(30)
    dns_cache_ttl: Duration = Duration(60)
    user_agent_suffix: str = "trivy-gateway/0.1"
    retry: RetrySettings = RetrySettings()
    circuit: CircuitSettings = CircuitSettings()
    #: per-host smoothing; the key "default" applies to hosts not listed
    limits: dict[str, HostLimitSettings] = field(default_factory=dict)
    credentials: tuple[CredentialSettings, ...] = ()
    #: groups of equivalent OCI repositories ("registry/repository", registry = host[:port])
    #: publishing identical artifacts
    failover_groups: tuple[tuple[str, ...], ...] = ()

    def limit_for(self, host: str) -> HostLimitSettings:
        return self.limits.get(host) or self.limits.get("default") or HostLimitSettings()

    def validate(self, path: str) -> None:
        for host, addr in self.address_overrides.items():
            h, sep, p = addr.rpartition(":")
            if not sep or not p.isdigit():
                raise ConfigError(f"{path}.address_overrides.{host}", f"expected HOST:PORT, got {addr!r}")
        for g, group in enumerate(self.failover_groups):
            for i, entry in enumerate(group):
                problem = repository_problem(entry)
                if problem:
                    raise ConfigError(f"{path}.failover_groups[{g}][{i}]", problem)
