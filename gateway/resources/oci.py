"""OCI distribution semantics (mirror.gcr.io, ghcr.io, any registry the operator adds).

- ``/v2/<name>/blobs/sha256:<hex>``: content-addressed, immutable, keyed by digest alone for
  public repositories (so the same DB fetched from ghcr.io answers mirror.gcr.io), by digest +
  a hash of the client's credentials otherwise (never served to a client without them).
- ``/v2/<name>/manifests/<digest>``: immutable, verified.
- ``/v2/<name>/manifests/<tag>``: the only mutable objects: TTL per repository, key includes the
  normalised ``Accept`` so an index is never served to a client that asked for a manifest.
- ``GET /v2/`` (the auth challenge) and anonymous token requests: short TTL, so a warm gateway
  can walk a client through the token dance with the upstream down.

Every key starts with the scheme the gateway fetches with (content fetched over plain HTTP never
answers an HTTPS request). Keys hold what is forwarded: a query string on a tag manifest or the
ping is part of the key (it is sent upstream and may select other content, e.g. containerd's
``?ns=``); blobs and manifests by digest are verified against the digest, so their query does
not matter.
"""
from __future__ import annotations

import hashlib
import re
from typing import Mapping, Optional

from ..settings import CacheSettings
from .model import IMMUTABLE, Resource

_BLOB_RE = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_MANIFEST_RE = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

ARTIFACTS = {
    "trivy-db": "vulnerability_db",
    "trivy-java-db": "java_db",
    "trivy-checks": "checks_bundle",
}


def artifact_of(repository: str) -> Optional[str]:
    return ARTIFACTS.get(repository.rsplit("/", 1)[-1])


def _credential_scope(headers: Mapping[str, str]) -> str:
    auth = headers.get("authorization", "")
    return hashlib.sha256(auth.encode()).hexdigest()[:32] if auth else "anonymous"


def normalise_accept(value: str) -> str:
    parts = sorted({p.split(";", 1)[0].strip().lower() for p in value.split(",") if p.strip()})
    return ",".join(parts) or "*/*"


def classify_oci(method: str, scheme: str, host: str, path: str, query: str,
                 headers: Mapping[str, str], cfg: CacheSettings) -> Optional[Resource]:
    """``host`` is the registry as ``host[:port]`` (:mod:`gateway.hostport`): a registry on a
    non-default port is matched, keyed, pinged and failed over under that name."""
    oci = cfg.oci
    if host not in oci.registries:
        return None
    stale = cfg.stale_limit("oci")
    origin = f"{scheme}://{host}"
    qs = "?" + query if query else ""
    if path in ("/v2/", "/v2") and method in ("GET", "HEAD"):
        if "authorization" in headers:
            return Resource("oci_auth", note="ping with credentials")
        return Resource("oci_auth", cache_key=f"oci-ping|{origin}{path}{qs}|{method}",
                        ttl=oci.auth_ttl, max_stale=stale, cacheable_statuses=(200, 401),
                        registry=host)
    if "scope=repository" in query and "/blobs/" not in path and "/manifests/" not in path:
        # the token endpoint (ghcr.io/token, mirror.gcr.io/v2/token …)
        if "authorization" in headers or method != "GET":
            return Resource("oci_auth", note="token request with credentials")
        return Resource("oci_auth", cache_key=f"oci-token|{origin}{path}{qs}", ttl=oci.auth_ttl,
                        max_stale=stale, registry=host)
    m = _BLOB_RE.match(path)
    if m and method in ("GET", "HEAD"):
        name, digest = m.group("name"), m.group("digest")
        public = f"{host}/{name}" in oci.public_repositories
        scope = "public" if public else _credential_scope(headers)
        return Resource("oci_blob", cache_key=f"blob|{scheme}|{digest}|{scope}", ttl=IMMUTABLE,
                        max_stale=stale, digest=digest, registry=host, repository=name,
                        reference=digest, public=public, artifact=artifact_of(name),
                        follow_redirects=True)
    m = _MANIFEST_RE.match(path)
    if m and method in ("GET", "HEAD"):
        name, ref = m.group("name"), m.group("ref")
        public = f"{host}/{name}" in oci.public_repositories
        scope = "public" if public else _credential_scope(headers)
        if _DIGEST_RE.match(ref):
            return Resource("oci_manifest", cache_key=f"manifest|{scheme}|{ref}|{scope}",
                            ttl=IMMUTABLE, max_stale=stale, digest=ref, registry=host,
                            repository=name, reference=ref, public=public, artifact=artifact_of(name))
        accept = normalise_accept(headers.get("accept", ""))
        key = f"tag|{origin}/{name}:{ref}{qs}|{accept}|{scope}"
        return Resource("oci_manifest", cache_key=key,
                        ttl=oci.ttl_for(host, name), max_stale=stale, registry=host,
                        repository=name, reference=ref, public=public, artifact=artifact_of(name),
                        refresh_ahead=oci.refresh_ahead)
    return None
