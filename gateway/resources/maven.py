"""Maven repository semantics (repo.maven.apache.org and configured repositories).

Release files (POM, JAR, checksums) never change once published: cached without expiry.
``maven-metadata.xml`` and anything under a ``-SNAPSHOT/`` directory change: short TTL.
A 404 is remembered as a negative entry (Trivy asks for the same missing POMs on every scan);
429 and 5xx are never stored (the pipeline only stores ``cacheable_statuses``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping, Optional

from ..settings import CacheSettings
from .model import IMMUTABLE, Resource


@lru_cache(maxsize=64)
def _repositories(repositories: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``host/prefix`` entries → (host, "/prefix/"), parsed once per configuration."""
    out = []
    for repo in repositories:
        rhost, _, prefix = repo.partition("/")
        out.append((rhost, "/" + prefix.strip("/") + "/" if prefix else "/"))
    return tuple(out)


@lru_cache(maxsize=4096)
def _file_resource(scheme: str, host: str, path: str, metadata_ttl: float, snapshot_ttl: float,
                   negative_ttl: Optional[float], max_stale: float) -> Resource:
    """The Resource of a plain GET/HEAD of one repository file. Memoised: a scan asks for the
    same POMs again and again, and building the frozen dataclass was most of classify's cost on
    a hit (Resource is immutable, so sharing one is safe); bounded, keyed by every input."""
    name = path.rsplit("/", 1)[-1]
    if name.startswith("maven-metadata.xml"):
        ttl = metadata_ttl
    elif "-SNAPSHOT/" in path:
        ttl = snapshot_ttl
    else:
        ttl = IMMUTABLE
    return Resource("maven", cache_key=f"maven|{scheme}://{host}{path}", ttl=ttl,
                    negative_ttl=negative_ttl, max_stale=max_stale, cacheable_statuses=(200,))


def classify_maven(method: str, scheme: str, host: str, path: str, query: str,
                   headers: Mapping[str, str], cfg: CacheSettings) -> Optional[Resource]:
    mv = cfg.maven
    for rhost, prefix in _repositories(mv.repositories):
        if host != rhost or not path.startswith(prefix):
            continue
        if method not in ("GET", "HEAD") or query:
            return Resource("maven", note="not a plain file GET")
        if "authorization" in headers:
            return Resource("maven", note="request carries credentials")
        return _file_resource(scheme, host, path, mv.metadata_ttl, mv.snapshot_ttl, mv.negative_ttl,
                              cfg.stale_limit("maven"))
    return None
