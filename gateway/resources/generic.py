"""RFC 9111 semantics for other intercepted hosts: cache only what the origin says is shareable.

Freshness comes from ``s-maxage``, ``max-age`` or ``Expires``; ``no-store``, ``private``,
``Set-Cookie``, ``Vary: *`` and requests with ``Authorization`` (without ``public``/``s-maxage``)
are not stored. No heuristic freshness: a response without explicit lifetime is not cached.
Repeated ``Cache-Control`` / ``Vary`` lines count together (callers pass fields folded by
:func:`~gateway.resources.model.fold_fields`): ``no-store`` on any line wins.

``Vary`` (RFC 9111 §4.1): a stored response records the values its request had for the
nominated fields (:func:`selected_fields`), and is only reused for a request with the same
values (:func:`variant_matches`); the pipeline keeps one variant per URL (a request for another
variant is a miss whose answer replaces the stored one).

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


def classify_generic(method: str, scheme: str, host: str, path: str, query: str,
                     headers: Mapping[str, str], cfg: CacheSettings) -> Resource:
    if not cfg.generic or method not in ("GET", "HEAD"):
        return Resource("generic", note="method or generic caching off")
    cc = parse_cache_control(headers.get("cache-control", ""))
    if "no-store" in cc:
        return Resource("generic", note="request no-store")
    target = path + ("?" + query if query else "")
    return Resource("generic", cache_key=f"generic|{scheme}://{host}{target}", ttl=0.0,
                    max_stale=cfg.stale_limit("generic"),
                    cacheable_statuses=(200, 203, 204, 300, 301, 308, 404, 410))


def vary_names(headers: Mapping[str, str]) -> Optional[tuple[str, ...]]:
    """The request fields a response varies on (lower-case, sorted), or None for ``Vary: *``
    (a response no later request can be proven to match)."""
    names = {n.strip().lower() for n in headers.get("vary", "").split(",") if n.strip()}
    if "*" in names:
        return None
    return tuple(sorted(names))


def selected_fields(names: tuple[str, ...], request: Mapping[str, str]) -> dict[str, Optional[str]]:
    """The values ``request`` (lower-case names, folded) has for ``names``, normalised (RFC 9111
    §4.1: whitespace around commas is insignificant); None for an absent field."""
    out: dict[str, Optional[str]] = {}
    for name in names:
        value = request.get(name)
        out[name] = None if value is None else ",".join(p.strip() for p in value.split(","))
    return out


def variant_matches(stored: Mapping[str, Optional[str]], request: Mapping[str, str]) -> bool:
    """May a response stored with selecting fields ``stored`` answer ``request``?"""
    return selected_fields(tuple(stored), request) == dict(stored)


def unshareable(headers: Mapping[str, str]) -> bool:
    """A response a shared cache must not store or hand to another client (RFC 9111 §3, §5.2.2):
    ``no-store``, ``private``, ``Set-Cookie`` or ``Vary: *``. ``headers``: folded, lower-case."""
    cc = parse_cache_control(headers.get("cache-control", ""))
    return ("no-store" in cc or "private" in cc or "set-cookie" in headers
            or vary_names(headers) is None)


def response_ttl(status: int, headers: Mapping[str, str], request_had_auth: bool,
                 now: Optional[float] = None) -> Optional[float]:
    """Freshness lifetime of a response under RFC 9111 for a shared cache, or None: don't store.

    ``headers``: lower-case names, repeated lines folded; ``now``: the caller's clock (the
    ``Expires`` arithmetic), wall time by default."""
    if unshareable(headers):
        return None
    cc = parse_cache_control(headers.get("cache-control", ""))
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
        return max(0.0, expires - (time.time() if now is None else now))
    if "no-cache" in cc:
        return 0.0
    return None


def github_ttl(headers: Mapping[str, str], configured: float) -> Optional[float]:
    """GitHub hosts: the operator's TTL (longer than GitHub's ``max-age=60``, to spare the API
    rate limit; entries are revalidated with ETag), but never for what RFC 9111 forbids a shared
    cache to store; ``no-cache`` means revalidate on every use."""
    if unshareable(headers):
        return None
    if "no-cache" in parse_cache_control(headers.get("cache-control", "")):
        return 0.0
    return configured
