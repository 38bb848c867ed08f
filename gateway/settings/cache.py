"""Cache sizing and the resource semantics of each upstream kind."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..hostport import registry_problem, repository_problem
from ._parse import ByteSize, ConfigError, Duration, at_least, secret

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
class S3Settings:
    """The shared blob tier: verified bodies in an S3-compatible bucket (docs/scale-out.md).
    Credentials come from the AWS SDK's standard chain (env, IRSA, instance metadata)."""

    #: "" = no S3 tier; e.g. https://s3.eu-west-1.amazonaws.com or http://seaweedfs:8333
    endpoint: str = ""
    bucket: str = "trivy-gateway"
    #: key prefix inside the bucket (several gateways may share one bucket)
    prefix: str = ""
    region: str = "us-east-1"
    #: send unsigned requests (test setups only; production S3 always needs credentials)
    anonymous: bool = False
    #: multipart upload part size (S3's minimum is 5 MiB)
    part_size: ByteSize = ByteSize(8 * 1024 * 1024)

    def validate(self, path: str) -> None:
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"{path}.endpoint", "must be an http:// or https:// URL")
        if self.endpoint and not 3 <= len(self.bucket) <= 63:
            raise ConfigError(f"{path}.bucket", "must be 3 to 63 characters (S3 bucket name)")
        if self.part_size < 5 * 1024 * 1024:
            raise ConfigError(f"{path}.part_size", "must be at least 5MiB (S3 minimum part size)")


@dataclass(frozen=True)
class SharedSettings:
    """State shared by replicas (docs/scale-out.md); all empty = one process, today's behaviour."""

    #: "" = in-process state; redis://[:password@]host:port/db = circuits, budget, fill leases
    #: and entries shared through Redis (needs the ``scale`` extra)
    redis_url: str = ""
    #: environment variable holding the Redis password (kept out of the YAML and the URL; a
    #: Kubernetes Secret); resolved into ``redis_password`` at load
    redis_password_env: str = ""
    redis_password: str = field(default="", repr=False, metadata=secret(
        "use cache.shared.redis_password_env"))
    #: a leader that died blocks other replicas' clients at most this long
    lease_ttl: Duration = Duration(15)
    #: host:port of this replica's peer endpoint (other replicas stream fills from it); "" = off
    peer_listen: str = ""
    #: host:port other replicas connect to; default: peer_listen, and with a wildcard host
    #: (0.0.0.0, ::) this host's address by its hostname (the pod IP in Kubernetes)
    peer_advertise: str = ""
    s3: S3Settings = S3Settings()

    def validate(self, path: str) -> None:
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ConfigError(f"{path}.redis_url", "must be a redis:// or rediss:// URL")
        if self.lease_ttl < 1:
            raise ConfigError(f"{path}.lease_ttl", "must be at least 1s")
        for key in ("peer_listen", "peer_advertise"):
            value = getattr(self, key)
            host, _, port = value.rpartition(":")
            if value and (not host or not port.isdigit()):
                raise ConfigError(f"{path}.{key}", f"must be host:port, got {value!r}")
        if (self.peer_listen or self.s3.endpoint) and not self.redis_url:
            raise ConfigError(f"{path}.redis_url", "peer_listen and s3 need redis_url (leases "
                              "and entries are shared through Redis)")

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)

    @property
    def redis_url_with_password(self) -> str:
        """``redis_url`` with ``redis_password`` in it (for clients that take only a URL)."""
        if not self.redis_password:
            return self.redis_url
        from urllib.parse import quote  # noqa: PLC0415

        scheme, _, rest = self.redis_url.partition("://")
        rest = rest.rpartition("@")[2]
        return f"{scheme}://:{quote(self.redis_password, safe='')}@{rest}"


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
    #: lifetime of API answers and raw files (the contents listing and vex-repository.json a
    #: VEX repository costs); long spares api.github.com's anonymous quota (60 an hour per
    #: address, where even a 304 counts)
    ttl: Duration = Duration(3600)
    #: lifetime of repository archives (``github.com/<owner>/<repo>/archive/…`` and its
    #: redirect, ``codeload.github.com``): what VEX repositories point at. Its own setting
    #: because VEX Hub's archive changes several times a day while the API answers around it
    #: hardly change; revalidating an archive (ETag) costs no API quota
    archive_ttl: Duration = Duration(3600)


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
    #: replicas acting as one cache (Redis + S3); empty = this process alone
    shared: SharedSettings = SharedSettings()
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
