"""RFC 9111 semantics for other intercepted hosts: cache only what the origin says is shareable.

Freshness comes from ``s-maxage``, ``max-age`` or ``Expires``; ``no-store``, ``private``,
``Set-Cookie``, ``Vary: *`` and requests with ``Authorization`` (without ``public``/``s-maxage``)
are not stored. No heuristic freshness: a response without explicit lifetime is not cached.
This module decides from the request; :func:`response_ttl` decides from the response.
"""
from __future__ import annotations

import email.utils
import time
from typing import Mapping, Optional

from ..settings import CacheSettings
from .model import Resource


def parse_cache_control(value: str) -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, arg = part.partition("=")
        out[name.strip().lower()] = arg.strip().strip('"') if arg else None
    return out


def classify_generic(method: str, host: str, path: str, query: str, headers: Mapping[str, str],
                     cfg: CacheSettings) -> Resource:
    if not cfg.generic or method not in ("GET", "HEAD"):
        return Resource("generic", note="method or generic caching off")
    cc = parse_cache_control(headers.get("cache-control", ""))
    if "no-store" in cc:
        return Resource("generic", note="request no-store")
    target = path + ("?" + query if query else "")
    return Resource("generic", cache_key=f"generic|{host}{target}", ttl=0.0,
                    max_stale=cfg.stale_limit("generic"),
                    cacheable_statuses=(200, 203, 204, 300, 301, 308, 404, 410))


def response_ttl(status: int, headers: Mapping[str, str], request_had_auth: bool,
                 now: Optional[float] = None) -> Optional[float]:
    """Freshness lifetime of a response under RFC 9111 for a shared cache, or None: don't store."""
    cc = parse_cache_control(headers.get("cache-control", ""))
    if "no-store" in cc or "private" in cc or "set-cookie" in headers:
        return None
    if headers.get("vary", "").strip() == "*":
        return None
    if request_had_auth and not ({"public", "s-maxage", "must-revalidate"} & cc.keys()):
        return None
    for directive in ("s-maxage", "max-age"):
        if directive in cc:
            try:
                return max(0.0, float(cc[directive] or 0))
            except ValueError:
                return None
    if "expires" in headers:
        try:
            expires = email.utils.parsedate_to_datetime(headers["expires"]).timestamp()
        except (TypeError, ValueError):
            return 0.0
        return max(0.0, expires - (now or time.time()))
    if "no-cache" in cc:
        return 0.0
    return None
