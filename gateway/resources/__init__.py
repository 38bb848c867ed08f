"""Resource semantics: what a request means for caching (pure functions, no I/O)."""
from __future__ import annotations

from typing import Mapping

from ..settings import CacheSettings
from .generic import classify_generic, parse_cache_control, response_ttl
from .github import classify_github
from .maven import classify_maven
from .model import IMMUTABLE, Resource
from .oci import artifact_of, classify_oci

__all__ = ["classify", "Resource", "IMMUTABLE", "response_ttl", "parse_cache_control",
           "artifact_of"]


def classify(method: str, host: str, path: str, query: str, headers: Mapping[str, str],
             cfg: CacheSettings) -> Resource:
    """Map a request to its :class:`Resource`; ``host`` is ``host[:port]`` (the port only when
    it is not the scheme's default); ``headers`` keys must be lower-case."""
    if not cfg.enabled:
        return Resource("passthrough", note="cache disabled")
    for fn in (classify_oci, classify_maven, classify_github):
        res = fn(method, host, path, query, headers, cfg)
        if res is not None:
            return res
    return classify_generic(method, host, path, query, headers, cfg)
