"""GitHub / VEX Hub semantics: contents API, raw files, archive redirect, codeload archives.

Cached with a TTL and revalidated with ETag/Last-Modified (repository archives, what VEX
repositories point at, with ``cache.github.archive_ttl``; everything else with
``cache.github.ttl``); the archive redirect (302 from
github.com to codeload.github.com) is cached as the redirect itself, so Trivy follows it through
the gateway and the archive bytes are cached under codeload's URL. api.github.com answers vary
by ``Accept`` and API version, which are part of the key. Requests carrying their own
credentials are passed through (a token's view of a private repository is not shareable).
Responses are held to RFC 9111 like any other host (``private``, ``no-store``, ``Set-Cookie``
and ``Vary``: :func:`~gateway.resources.generic.github_ttl`), only the lifetime is the
operator's.
"""
from __future__ import annotations

from typing import Mapping, Optional

from ..settings import CacheSettings
from .model import Resource


def classify_github(method: str, scheme: str, host: str, path: str, query: str,
                    headers: Mapping[str, str], cfg: CacheSettings) -> Optional[Resource]:
    gh = cfg.github
    if host not in gh.hosts:
        return None
    if method not in ("GET", "HEAD"):
        return Resource("github", note="not GET/HEAD")
    if "authorization" in headers:
        return Resource("github", note="request carries credentials")
    vary = ""
    if host == "api.github.com":
        vary = "|" + headers.get("accept", "") + "|" + headers.get("x-github-api-version", "")
    target = path + ("?" + query if query else "")
    archive = _is_archive(host, path)
    artifact = "vex_hub" if "vexhub" in path and (host == "codeload.github.com"
                                                   or "/archive/" in path) else None
    return Resource("github", cache_key=f"github|{scheme}://{host}{target}{vary}",
                    ttl=gh.archive_ttl if archive else gh.ttl,
                    max_stale=cfg.stale_limit("github"), artifact=artifact,
                    cacheable_statuses=(200, 301, 302, 307, 308))


def _is_archive(host: str, path: str) -> bool:
    """A repository archive: everything codeload.github.com serves, and github.com's
    ``/<owner>/<repo>/archive/<ref>`` (the 302 to codeload) — what a VEX repository lists."""
    if host == "codeload.github.com":
        return True
    return host == "github.com" and path.split("/", 4)[3:4] == ["archive"]
