"""Cache sizing and the resource semantics of each upstream kind."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..hostport import registry_problem, repository_problem
from ._parse import ByteSize, ConfigError, Duration, at_least

MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryFrontSettings:
    """aiocache front for small hot entries (manifests, tokens, POMs), so hits skip the disk."""

    #: "memory" (per process) or "redis" (shared by replicas; needs the redis extra)
    backend: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: bodies up to this size are kept in memory
    max_item_size: ByteSize = ByteSize(256 * 1024)
    #: total bytes held in the memory front
    max_size: ByteSize = ByteSize(64 * 1024 * 1024)

    def validate(self, path: str) -> None:
        if self.backend not in ("memory", "redis"):
            raise ConfigError(f"{path}.backend", "must be memory or redis")
        if self.max_item_size > self.max_size:
            raise ConfigError(f"{path}.max_item_size", "cannot be larger than memory.max_size")


@dataclass(frozen=True)
class OCISettings:
    #: registries whose /v2/ API is understood (blobs by digest, manifests by tag/digest), as
    #: ``host`` or ``host:port`` (a registry on a non-default port: ``registry.corp:5000``)
    registries: tuple[str, ...] = ("mirror.gcr.io", "ghcr.io")
    #: "registry/repository" whose content may be shared between clients and across registries
    #: (public artifacts); content of other repositories fetched with a client's credentials is
    #: only served to requests carrying the same credentials
    public_repositories: tuple[str, ...] = ()
    #: TTL of a manifest fetched by tag, per "registry/repository" (or "default")
    tag_ttl: dict[str, Duration] = field(default_factory=dict)
    #: a tag manifest is refreshed in the background once this fraction of its TTL has passed
    refresh_ahead: float = 0.8
    #: /v2/ ping and anonymous token answers are kept this long (served stale when upstream is down)
    auth_ttl: Duration = Duration(240)

    def validate(self, path: str) -> None:
        for i, registry in enumerate(self.registries):
            problem = registry_problem(registry)
            if problem:
                raise ConfigError(f"{path}.registries[{i}]", problem)
        for i, entry in enumerate(self.public_repositories):
            problem = repository_problem(entry)
            if problem:
                raise ConfigError(f"{path}.public_repositories[{i}]", problem)

    def ttl_for(self, registry: str, repository: str) -> float:
        return float(self.tag_ttl.get(f"{registry}/{repository}")
                     or self.tag_ttl.get(repository) or self.tag_ttl.get("default") or 3600)


@dataclass(frozen=True)
class MavenSettings:
    #: "host/path-prefix" of Maven repositories (release files immutable, metadata short TTL)
    repositories: tuple[str, ...] = ("repo.maven.apache.org/maven2",)
    metadata_ttl: Duration = Duration(600)
    snapshot_ttl: Duration = Duration(600)
    negative_ttl: Duration = Duration(3600)


@dataclass(frozen=True)
class GitHubSettings:
    #: hosts with GitHub/VEX Hub semantics (TTL + ETag/Last-Modified revalidation)
    hosts: tuple[str, ...] = ("api.github.com", "raw.githubusercontent.com", "github.com",
                              "codeload.github.com")
    ttl: Duration = Duration(3600)


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = True
    #: disk budget for cached bodies; least recently used entries are evicted beyond it
    max_size: ByteSize = ByteSize(20 * 1024**3)
    #: keep at least this much free on the filesystem; below it new fills are not stored
    min_free_space: ByteSize = ByteSize(512 * 1024**2)
    #: the largest body stored, as a share of max_size (0 < share <= 1): a larger one is served
    #: without being stored, and a fill of unknown length stops being stored when it passes it,
    #: so one object never evicts (nearly) everything else
    max_object_share: float = 0.5
    #: how long past expiry content may still be served when the upstream fails, per kind
    max_stale: dict[str, Duration] = field(default_factory=dict)
    memory: MemoryFrontSettings = MemoryFrontSettings()
    oci: OCISettings = OCISettings()
    maven: MavenSettings = MavenSettings()
    github: GitHubSettings = GitHubSettings()
    #: RFC 9111 caching for other intercepted hosts (shared cache; private/no-store respected)
    generic: bool = True

    def validate(self, path: str) -> None:
        if not 0 < self.max_object_share <= 1:
            raise ConfigError(f"{path}.max_object_share",
                              f"must be a share of max_size in (0, 1], got {self.max_object_share}")
        # a budget below one MiB cannot hold a single Trivy manifest + DB layer; it is a typo
        # ("10" for "10GiB"), not a choice
        at_least(self.max_size, MIB, f"{path}.max_size", "1MiB (write e.g. '20GiB')")

    @property
    def max_object_size(self) -> int:
        return int(self.max_size * self.max_object_share)

    def stale_limit(self, kind: str) -> float:
        return float(self.max_stale.get(kind) or self.max_stale.get("default") or 7 * 86400)
