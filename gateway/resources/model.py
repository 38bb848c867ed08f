"""What a request *means* to the cache: a pure description, no I/O.

:func:`gateway.resources.classify` maps (method, host, path, query, headers) to one
:class:`Resource`; the pipeline acts on it. Keeping the semantics pure makes them testable as
tables and keeps cache keys free of anything that varies per request (signed query strings,
tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Iterable, Optional

IMMUTABLE = float("inf")


class Scheme(StrEnum):
    """The scheme the gateway *fetches* the resource with, part of every cache key.

    Why: content fetched over plain HTTP (which anyone on the path can forge) must never answer
    a request the gateway fetches over HTTPS. The mirror front door serves plain-HTTP clients but
    fetches upstream over HTTPS, so the key follows the upstream URL, not the client connection.
    """

    HTTPS = "https"
    HTTP = "http"


def fold_fields(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header fields → {lower-case name: value}, repeated lines combined with ", ".

    RFC 9110 §5.3: a recipient may combine repeated field lines into one comma-separated value;
    reading only the last line lets ``Cache-Control: no-store`` followed by
    ``Cache-Control: max-age=600`` be stored. (``Set-Cookie`` is not a list, but only its
    presence matters here.)"""
    out: dict[str, str] = {}
    for k, v in items:
        name = k.lower()
        out[name] = f"{out[name]}, {v}" if name in out else v
    return out


@dataclass(frozen=True)
class Resource:
    #: oci_blob | oci_manifest | oci_auth | maven | github | generic | passthrough
    kind: str
    #: None: never cached (pass through)
    cache_key: Optional[str] = None
    #: seconds a stored response stays fresh (IMMUTABLE for content-addressed/release files)
    ttl: float = 0.0
    #: seconds a 404 is remembered (None: 404 is not cached)
    negative_ttl: Optional[float] = None
    #: how long past expiry it may be served when the upstream fails
    max_stale: float = 0.0
    #: the body must hash to this (OCI blob/manifest by digest)
    digest: Optional[str] = None
    #: OCI coordinates
    registry: Optional[str] = None
    repository: Optional[str] = None
    reference: Optional[str] = None
    #: public content may be shared between clients and fetched with the gateway's own token
    public: bool = True
    #: Trivy artifact this is part of (vulnerability_db, java_db, checks_bundle, vex_hub)
    artifact: Optional[str] = None
    #: fetch with redirects followed by the gateway (blobs → signed CDN URLs)
    follow_redirects: bool = False
    #: statuses worth storing
    cacheable_statuses: tuple[int, ...] = (200,)
    #: refresh in the background once this fraction of the TTL has passed (0: never)
    refresh_ahead: float = 0.0
    #: why it is not cached (for logs), when cache_key is None
    note: str = ""

    @property
    def immutable(self) -> bool:
        return self.ttl == IMMUTABLE

    @property
    def cacheable(self) -> bool:
        return self.cache_key is not None
