"""The mirror door: Trivy's artifacts served as a registry / Maven repository / VEX repository.

Scanners that use the mirror door need no gateway CA: they name the gateway as a mirror in their
own configuration (``registry.mirrors``, ``--db-repository``, settings.xml ``<mirrors>``,
``repository.yaml``) and talk plain HTTP (or TLS with the operator's own certificate). The
upstreams named here must also be known to the cache (``cache.oci.public_repositories``,
``cache.maven.repositories``, ``cache.github.hosts``): the door only translates requests, the
cache and fetch semantics are the proxy door's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from ._parse import ConfigError

#: a short name, a Maven path name or a VEX repository name: path segments of safe characters
_NAME = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")


@dataclass(frozen=True)
class MirrorTLSSettings:
    """TLS on the mirror listener with the operator's own certificate (from the organisation's
    usual PKI, which scanners already trust). Both unset: plain HTTP."""

    cert: Optional[str] = None
    key: Optional[str] = None

    def validate(self, path: str) -> None:
        if bool(self.cert) != bool(self.key):
            raise ConfigError(path, "cert and key must be given together")

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True)
class MirrorOCISettings:
    #: ``/v2/<short name>/…`` → ``<registry>/<repository>``, so ``--db-repository
    #: gateway:5000/aquasec/trivy-db:2`` works; the failover group of the target applies
    short_names: dict[str, str] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        for name, target in self.short_names.items():
            if not _NAME.match(name):
                raise ConfigError(f"{path}.short_names.{name}",
                                  "a short name is lower-case path segments like aquasec/trivy-db")
            registry, _, repository = target.partition("/")
            if not registry or not repository:
                raise ConfigError(f"{path}.short_names.{name}",
                                  f"expected REGISTRY/REPOSITORY, got {target!r}")


@dataclass(frozen=True)
class MirrorSettings:
    tls: MirrorTLSSettings = MirrorTLSSettings()
    oci: MirrorOCISettings = MirrorOCISettings()
    #: ``/<path name>/…`` → a Maven repository ``host/prefix`` (one of cache.maven.repositories)
    maven: dict[str, str] = field(default_factory=dict)
    #: ``/vex/<name>/.well-known/vex-repository.json`` → the upstream repository manifest's URL
    vex: dict[str, str] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        for name, repo in self.maven.items():
            if not _NAME.match(name) or name in ("v2", "vex"):
                raise ConfigError(f"{path}.maven.{name}", "the path name must be lower-case path "
                                  "segments other than v2 and vex, like maven2")
            if "/" not in repo.strip("/") or "://" in repo:
                raise ConfigError(f"{path}.maven.{name}",
                                  f"expected HOST/PATH like repo.maven.apache.org/maven2, got {repo!r}")
        for name, url in self.vex.items():
            if not _NAME.match(name) or "/" in name:
                raise ConfigError(f"{path}.vex.{name}", "the name must be one lower-case segment")
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.hostname or not parts.path.endswith(".json"):
                raise ConfigError(f"{path}.vex.{name}", "expected the https:// URL of a "
                                  f"vex-repository.json, got {url!r}")
