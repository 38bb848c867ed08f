"""The gateway's own OCI registry tokens (distribution token flow), cached per repository.

``GET https://<registry>/v2/`` (``<registry>`` is ``host[:port]``: a registry on a non-default
port is pinged, asked for tokens and cached under that port, see :mod:`gateway.hostport`) → 401 ``WWW-Authenticate: Bearer realm=…,service=…`` →
``GET <realm>?scope=repository:<repo>:pull&service=<service>`` (with Basic credentials when some are
configured for the registry) → ``{"token"|"access_token", "expires_in"}``. The challenge is cached
per registry, tokens per (registry, repository) until shortly before they expire; concurrent
requests for the same repository share one token fetch.

When the registry or its token endpoint answers something unusable (429, 5xx, 403 …) that
answer is handed back to the caller as the response (:class:`TokenFailed`), so the cache layer can
decide (serve stale, fail over) exactly as for any other upstream status.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Awaitable, Callable, Optional

from multidict import CIMultiDict
from yarl import URL

from ..hostport import canonical_authority, url_authority
from ..observability.logging import get_logger
from .credentials import CredentialStore
from .types import UpstreamError, UpstreamRequest, UpstreamResponse

#: sends a request (redirects followed, no injected credentials): the client's, handed in so
#: that this module does not import the client (which builds it)
Fetch = Callable[[UpstreamRequest], Awaitable[UpstreamResponse]]

log = get_logger("gateway.upstream")

CHALLENGE_TTL = 3600.0
ANONYMOUS_TTL = 300.0
_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


class TokenFailed(Exception):
    def __init__(self, response: UpstreamResponse) -> None:
        super().__init__(f"token flow answered {response.status}")
        self.response = response


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = value.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


class RegistryTokens:
    def __init__(self, fetch: Fetch, credentials: CredentialStore) -> None:
        self._fetch = fetch
        self.credentials = credentials
        #: registry → (scheme, params, fetched_at); scheme "" = no auth needed
        self._challenges: dict[str, tuple[str, dict[str, str], float]] = {}
        #: (registry, repository) → (Authorization value or None, valid_until)
        self._tokens: dict[tuple[str, str], tuple[Optional[str], float]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.fetches = 0

    def learn_challenge(self, registry: str, www_authenticate: str) -> None:
        """Keep the Bearer challenge of a ``/v2/`` answer that passed through for a client.

        Trivy pings ``/v2/`` itself before asking for a manifest; without this, the gateway's
        own token flow would ping the registry a second time for the same challenge."""
        scheme, params = parse_challenge(www_authenticate)
        if scheme != "bearer" or not params.get("realm"):
            return
        params.pop("scope", None)                # per request; the gateway asks for its own
        self._challenges[canonical_authority(registry)] = (
            scheme, params, asyncio.get_running_loop().time())

    def invalidate(self, registry: str, repository: str) -> None:
        self._tokens.pop((canonical_authority(registry), repository), None)
        self._challenges.pop(canonical_authority(registry), None)

    async def authorization(self, registry: str, repository: str, deadline: float
                            ) -> Optional[str]:
        """The Authorization value for pulling ``repository`` from ``registry`` (``host[:port]``)."""
        key = (canonical_authority(registry), repository)
        loop = asyncio.get_running_loop()
        cached = self._tokens.get(key)
        if cached and cached[1] > loop.time():
            return cached[0]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached and cached[1] > loop.time():
                return cached[0]
            value, ttl = await self._obtain(key[0], repository, deadline)
            self._tokens[key] = (value, loop.time() + ttl)
            return value

    async def _get(self, url: str, deadline: float, headers: Optional[CIMultiDict] = None,
                   kind: str = "oci_auth") -> UpstreamResponse:
        return await self._fetch(UpstreamRequest("GET", url, headers=headers or CIMultiDict(),
                                                 deadline=deadline, kind=kind,
                                                 follow_redirects=True))

    async def _challenge(self, registry: str, deadline: float) -> tuple[str, dict[str, str]]:
        loop = asyncio.get_running_loop()
        cached = self._challenges.get(registry)
        if cached and loop.time() - cached[2] < CHALLENGE_TTL:
            return cached[0], cached[1]
        resp = await self._get(f"https://{registry}/v2/", deadline)
        if resp.status == 401:
            await resp.release()
            scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        elif 200 <= resp.status < 300:
            await resp.release()
            scheme, params = "", {}
        else:
            raise TokenFailed(resp)
        self._challenges[registry] = (scheme, params, loop.time())
        return scheme, params

    async def _obtain(self, registry: str, repository: str, deadline: float
                      ) -> tuple[Optional[str], float]:
        scheme, params = await self._challenge(registry, deadline)
        creds = self.credentials
        if scheme == "":
            return None, ANONYMOUS_TTL
        if scheme == "basic":
            return creds.basic_for(registry), ANONYMOUS_TTL
        if scheme != "bearer" or not params.get("realm"):
            raise UpstreamError("protocol", registry,
                                f"{registry} asks for unsupported authentication {scheme!r}",
                                status=502)
        realm = URL(params["realm"], encoded=True)
        if realm.scheme != "https" and url_authority(realm) != registry:
            raise UpstreamError("protocol", registry,
                                f"{registry} names a non-https token realm; refusing", status=502)
        query = {"scope": f"repository:{repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        url = realm.update_query(query)
        headers = CIMultiDict()
        basic = creds.basic_for(registry)
        if basic:
            headers["Authorization"] = basic
        self.fetches += 1
        resp = await self._get(str(url), deadline, headers)
        if resp.status != 200:
            raise TokenFailed(resp)
        try:
            data = json.loads(await resp.read(1024 * 1024))
        except (ValueError, UnicodeDecodeError):
            raise UpstreamError("protocol", registry, f"token endpoint of {registry} did not "
                                "answer JSON", status=502) from None
        token = data.get("token") or data.get("access_token")
        if not token:
            raise UpstreamError("protocol", registry, f"token endpoint of {registry} gave no "
                                "token", status=502)
        try:
            expires_in = float(data.get("expires_in") or 60)
        except (TypeError, ValueError):
            expires_in = 60.0
        margin = min(30.0, max(1.0, expires_in * 0.1))
        log.info("registry_token", registry=registry, repository=repository,
                 expires_in=expires_in, anonymous=not basic)
        return f"Bearer {token}", max(1.0, expires_in - margin)
