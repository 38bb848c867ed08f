"""Maven repository semantics (repo.maven.apache.org and configured repositories).

Release files (POM, JAR, checksums) never change once published: cached without expiry.
``maven-metadata.xml`` and anything under a ``-SNAPSHOT/`` directory change: short TTL.
A 404 is remembered as a negative entry (Trivy asks for the same missing POMs on every scan);
429 and 5xx are never stored (the pipeline only stores ``cacheable_statuses``).
"""
from __future__ import annotations

from typing import Mapping, Optional

from ..settings import CacheSettings
from .model import IMMUTABLE, Resource


def classify_maven(method: str, host: str, path: str, query: str, headers: Mapping[str, str],
                   cfg: CacheSettings) -> Optional[Resource]:
    mv = cfg.maven
    for repo in mv.repositories:
        rhost, _, prefix = repo.partition("/")
        prefix = "/" + prefix.strip("/") + "/" if prefix else "/"
        if host != rhost or not path.startswith(prefix):
            continue
        if method not in ("GET", "HEAD") or query:
            return Resource("maven", note="not a plain file GET")
        if "authorization" in headers:
            return Resource("maven", note="request carries credentials")
        name = path.rsplit("/", 1)[-1]
        if name.startswith("maven-metadata.xml"):
            ttl = mv.metadata_ttl
        elif "-SNAPSHOT/" in path:
            ttl = mv.snapshot_ttl
        else:
            ttl = IMMUTABLE
        return Resource("maven", cache_key=f"maven|{host}{path}", ttl=ttl,
                        negative_ttl=mv.negative_ttl, max_stale=cfg.stale_limit("maven"),
                        cacheable_statuses=(200,))
    return None
