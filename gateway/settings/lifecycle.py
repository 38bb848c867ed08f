"""``lifecycle``: the gateway owns the lifecycle of the artifacts Trivy needs (prefetch)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from ._parse import ConfigError, Duration


class PrefetchSource(StrEnum):
    #: an OCI tag (``registry/repository:tag``): manifest + every layer
    OCI = "oci"
    #: the VEX Hub archive (``https://github.com/<owner>/<repo>/archive/refs/heads/<branch>.tar.gz``)
    VEX_HUB = "vex_hub"


@dataclass(frozen=True)
class PrefetchArtifactSettings:
    #: what to watch: ``mirror.gcr.io/aquasec/trivy-db:2`` (oci) or the archive URL (vex_hub)
    reference: str = ""
    source: PrefetchSource = PrefetchSource.OCI
    #: false: never prefetched (clients still fill the cache on demand)
    enabled: bool = True
    #: how often the tag is checked; unset: ``lifecycle.prefetch.interval``
    interval: Optional[Duration] = None

    def validate(self, path: str) -> None:
        if not self.reference:
            raise ConfigError(f"{path}.reference", "a reference is required")
        if self.source == PrefetchSource.OCI:
            name, _, tag = self.reference.rpartition(":")
            if "/" not in name or not tag or "/" in tag or "@" in self.reference:
                raise ConfigError(f"{path}.reference", "expected REGISTRY/REPOSITORY:TAG, got "
                                  f"{self.reference!r}")
        elif not self.reference.startswith("https://"):
            raise ConfigError(f"{path}.reference", "expected an https:// URL of the VEX Hub "
                              f"archive, got {self.reference!r}")
        if self.interval is not None and self.interval < 1:
            raise ConfigError(f"{path}.interval", "must be at least 1s")

    @property
    def host(self) -> str:
        if self.source == PrefetchSource.VEX_HUB:
            return self.reference.split("/", 3)[2]
        return self.reference.split("/", 1)[0]

    @property
    def repository(self) -> str:
        return self.reference.split("/", 1)[1].rpartition(":")[0]

    @property
    def tag(self) -> str:
        return self.reference.rpartition(":")[2]


@dataclass(frozen=True)
class PrefetchSettings:
    enabled: bool = True
    #: default check interval of every artifact
    interval: Duration = Duration(3600)
    #: each wait is the interval ± this fraction, so replicas do not check in lockstep
    jitter: float = 0.1
    #: generations kept per artifact (the newest first); older ones are evicted
    keep: int = 2
    #: artifact name (vulnerability_db, java_db, checks_bundle, vex_hub, or your own) → what
    #: to watch; a mapping so an operator's file can switch one off without repeating the rest
    artifacts: dict[str, PrefetchArtifactSettings] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"{path}.jitter", "must be at least 0 and below 1")
        if self.keep < 1:
            raise ConfigError(f"{path}.keep", "must be at least 1 (the generation served)")
        if self.interval < 1:
            raise ConfigError(f"{path}.interval", "must be at least 1s")

    def interval_of(self, artifact: PrefetchArtifactSettings) -> float:
        return float(artifact.interval if artifact.interval is not None else self.interval)


@dataclass(frozen=True)
class LifecycleSettings:
    prefetch: PrefetchSettings = PrefetchSettings()
