"""Where the gateway listens and keeps its state, and how it shuts down."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from ._parse import ConfigError, Duration, secret


def split_hostport(value: str, path: str) -> tuple[str, int]:
    """``"0.0.0.0:3128"`` → ``("0.0.0.0", 3128)``; ``"[::1]:3128"`` works too."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(path, f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class ServerSettings:
    #: proxy clients connect here (HTTPS_PROXY=http://host:3128)
    listen: str = "0.0.0.0:3128"
    #: /metrics, /healthz, /readyz and the status page, on a separate port so the proxy port
    #: never serves anything but proxy traffic
    admin_listen: str = "0.0.0.0:9128"
    #: the mirror door (registry / Maven / VEX mirror for scanners without the gateway CA);
    #: "" = off. Off by default: it answers anyone who can reach it without proxy auth, so an
    #: operator opens it deliberately (see the README, "Mirror door")
    mirror_listen: str = ""
    #: optional bearer token protecting /metrics, /api/status and the status page; the token
    #: comes from this env variable or file (probes keep /healthz, /readyz and /ca.pem open)
    admin_token_env: str = "TRIVY_GATEWAY_ADMIN_TOKEN"
    admin_token_file: Optional[str] = None
    #: resolved at load time from the two above; never logged, never a YAML key
    admin_token: str = field(default="", repr=False, metadata=secret(
        "use server.admin_token_file or server.admin_token_env"))
    #: CA, cache and state; created on first start
    data_dir: str = "./gateway-data"
    #: on SIGTERM: stop accepting, let in-flight transfers finish for this long, then exit
    drain_grace: Duration = Duration(30)
    #: "asyncio" (stdlib; zero-copy sendfile for plain-HTTP hits) or "uvloop" (faster TLS and
    #: small responses; needs the uvloop extra). bench/run.py measures both.
    event_loop: str = "asyncio"
    #: processes serving the same ports (SO_REUSEPORT), each a replica of one cache
    #: (docs/scale-out.md): a number, or "auto" = one per CPU; more than 1 needs
    #: cache.shared.redis_url
    workers: str = "1"
    #: open the proxy and mirror listeners with SO_REUSEPORT (set for each worker by
    #: server.workers; set it yourself to run several gateways on the same port)
    reuse_port: bool = False

    def validate(self, path: str) -> None:
        if self.event_loop not in ("asyncio", "uvloop"):
            raise ConfigError(f"{path}.event_loop", "must be asyncio or uvloop")
        if self.workers != "auto" and not (self.workers.isdigit() and int(self.workers) >= 1):
            raise ConfigError(f"{path}.workers", f"must be a number >= 1 or auto, got "
                              f"{self.workers!r}")
        split_hostport(self.listen, f"{path}.listen")
        split_hostport(self.admin_listen, f"{path}.admin_listen")
        if self.mirror_listen:
            split_hostport(self.mirror_listen, f"{path}.mirror_listen")

    @property
    def listen_addr(self) -> tuple[str, int]:
        return split_hostport(self.listen, "server.listen")

    @property
    def mirror_addr(self) -> Optional[tuple[str, int]]:
        if not self.mirror_listen:
            return None
        return split_hostport(self.mirror_listen, "server.mirror_listen")

    @property
    def worker_count(self) -> int:
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else os.cpu_count() or 1)
        return int(self.workers)

    @property
    def admin_addr(self) -> tuple[str, int]:
        return split_hostport(self.admin_listen, "server.admin_listen")
