"""Resource semantics: what a request means for caching (pure functions, no I/O)."""
from __future__ import annotations

from typing import Mapping

from ..settings import CacheSettings
from .generic import (classify_generic, github_ttl, parse_cache_control, response_ttl,
                      selected_fields, unshareable, variant_matches, vary_names)
from .github import classify_github
from .maven import classify_maven
from .model import IMMUTABLE, Resource, Scheme, fold_fields
from .oci import artifact_of, classify_oci

__all__ = ["classify", "Resource", "IMMUTABLE", "Scheme", "fold_fields", "response_ttl",
           "github_ttl", "parse_cache_control", "artifact_of", "vary_names", "selected_fields",
           "variant_matches", "unshareable"]


def classify(method: str, host: str, path: str, query: str, headers: Mapping[str, str],
             cfg: CacheSettings, *, scheme: str) -> Resource:
    """Map a request to its :class:`Resource`; ``host`` is ``host[:port]`` (the port only when
    it is not the scheme's default); ``headers``: lower-case names, repeated fields folded
    (:func:`fold_fields`). ``scheme``: the scheme the gateway fetches with (http or https), part
    of every cache key (see :class:`Scheme`)."""
    if not cfg.enabled:
        return Resource("passthrough", note="cache disabled")
    for fn in (classify_oci, classify_maven, classify_github):
        res = fn(method, scheme, host, path, query, headers, cfg)
        if res is not None:
            return res
    return classify_generic(method, scheme, host, path, query, headers, cfg)
