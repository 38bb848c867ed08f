"""Walking a client through the registry auth dance when the registry cannot be reached.

Trivy always starts with ``GET /v2/`` and an anonymous token request before it asks for a
manifest. If mirror.gcr.io is down and nothing is cached, a plain 502 on ``/v2/`` stops Trivy
before it reaches the manifest and blob requests — the ones the gateway can fail over to an
equivalent registry or answer from the cache. For public repositories the gateway never uses the
client's token (it fetches with its own), so it can safely answer the ping with a Bearer challenge
pointing back at itself and the token request with an opaque placeholder token.
"""
from __future__ import annotations

import json
import re
from typing import Optional
from urllib.parse import parse_qs

from multidict import CIMultiDict

from ..exchange import BytesBody, Exchange, Response
from ..observability.metrics import CacheResult
from ..resources import Resource
from ..settings import CacheSettings
from .serve import cache_status

OFFLINE_TOKEN_PATH = "/v2/token"
#: handed to clients for public repositories; never sent upstream (the gateway uses its own)
GATEWAY_TOKEN = "trivy-gateway-public"
_SCOPE_RE = re.compile(r"^repository:(?P<repo>[^:]+):pull$")


def offline_auth_response(ex: Exchange, res: Resource, cfg: CacheSettings) -> Optional[Response]:
    """A synthetic challenge or token for a registry that is unreachable, or None."""
    registry = ex.authority
    if registry not in cfg.oci.registries or ex.method not in ("GET", "HEAD"):
        return None
    status_value = cache_status(CacheResult.MISS, detail="offline-auth")
    if ex.path in ("/v2/", "/v2"):
        challenge = (f'Bearer realm="https://{registry}{OFFLINE_TOKEN_PATH}",'
                     f'service="{registry}"')
        body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        headers = CIMultiDict({"Content-Type": "application/json", "WWW-Authenticate": challenge,
                               "Docker-Distribution-API-Version": "registry/2.0",
                               "Cache-Status": status_value, "Cache-Control": "no-store"})
        return Response(401, headers, BytesBody(b"" if ex.method == "HEAD" else body),
                        source="gateway")
    return public_token_response(ex, cfg, status_value)


def public_token_response(ex: Exchange, cfg: CacheSettings,
                          status_value: Optional[str] = None) -> Optional[Response]:
    """A placeholder token for an anonymous token request whose scopes are all public, or None.

    The gateway fetches public repositories with its own registry token and ignores the
    client's, so asking the upstream token endpoint on the client's behalf would only spend the
    registry's rate limit (and fail when it is down).
    """
    registry = ex.authority
    if ex.method != "GET" or "authorization" in ex.headers or registry not in cfg.oci.registries:
        return None
    scopes = parse_qs(ex.query).get("scope", [])
    repos = [m.group("repo") for m in (_SCOPE_RE.match(s) for s in scopes) if m]
    if not repos or len(repos) != len(scopes) or any(
            f"{registry}/{r}" not in cfg.oci.public_repositories for r in repos):
        return None  # only public repositories: their content never depends on the token
    body = json.dumps({"token": GATEWAY_TOKEN, "access_token": GATEWAY_TOKEN,
                       "expires_in": 300}).encode()
    headers = CIMultiDict({"Content-Type": "application/json", "Cache-Control": "no-store",
                           "Cache-Status": status_value
                           or cache_status(CacheResult.HIT, detail="gateway-token")})
    return Response(200, headers, BytesBody(body), source="gateway")
