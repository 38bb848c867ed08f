"""The upstream client: one aiohttp session for every upstream host, made polite and resilient.

:meth:`UpstreamClient.request` sends an :class:`UpstreamRequest` and answers with a streamed
:class:`UpstreamResponse` (any status, 429/5xx included once retries are exhausted) or raises
:class:`UpstreamError`. The parts: ``redirect.py`` follows redirects (no https → http
downgrade); ``hop.py`` sends each hop through the circuit breaker and the per-host limiter, with
retries, Retry-After and pushback; whether to retry is the pure ``decide.py``; ``response.py`` is
the body stream, continued with ``Range`` by ``resume.py`` when it is cut; ``hosts.py`` holds the
per-host state (bounded for wildcard hosts). The gateway's own registry tokens
(``registry_auth.py``) and blind tunnels (``tunnel.py``) are handed what they need and do not
import this module.
"""
from __future__ import annotations

import asyncio
import base64
import os
import ssl
from typing import Awaitable, Callable, Optional
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict
from yarl import URL

from ..hostport import canonical_authority, url_authority
from ..observability.logging import get_logger
from ..observability.metrics import Metrics
from ..settings import UpstreamSettings
from .circuit import CircuitBreaker
from .credentials import CredentialStore
from .failover import Failover
from .hop import HopSender
from .hosts import HostTable
from .redirect import follow
from .registry_auth import RegistryTokens, TokenFailed
from .resolver import AddressGuard, OverrideResolver
from .response import StreamedResponse
from .resume import BodyResumer
from .tunnel import open_tunnel
from .types import UpstreamRequest, UpstreamResponse

log = get_logger("gateway.upstream")

#: request headers never passed on (the session computes them, or they are hop-by-hop).
#: ``Expect: 100-continue`` is answered by the proxy towards the client; passed on, aiohttp would
#: hold the body back until the upstream sends 100, and one that never does hangs to the deadline
_DROP_REQUEST_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive",
    "proxy-connection", "proxy-authorization", "proxy-authenticate", "te", "trailer", "upgrade",
    "expect",
})
#: aiohttp would add these itself; the gateway passes the client's own (or none)
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class UpstreamClient:
    def __init__(self, settings: UpstreamSettings, metrics: Metrics, *,
                 address_guard: Optional[AddressGuard] = None,
                 dns: Optional[AbstractResolver] = None) -> None:
        """``address_guard``: the SSRF guard (``Policy.address_allowed``); ``dns``: the name
        resolver behind overrides and guard (default: the system's)."""
        self.settings = settings
        self.metrics = metrics
        self._session: Optional[aiohttp.ClientSession] = None
        self._ssl: Optional[ssl.SSLContext] = None
        self.credentials = CredentialStore(settings.credentials)
        self.failover = Failover(settings.failover_groups, metrics)
        parent = settings.parent_proxy
        proxy_host = urlsplit(parent.url).hostname if parent.url else None
        self.resolver = OverrideResolver(settings.address_overrides, address_guard,
                                         trusted_hosts=(proxy_host,) if proxy_host else (),
                                         inner=dns)
        #: seam for state shared by replicas (gateway/shared/, wired by the app; None: this
        #: process alone): told of every circuit transition
        self.on_circuit_change: Optional[Callable[[str, CircuitBreaker, str, str], None]] = None
        self.hosts = HostTable(settings, metrics, on_circuit_change=self._circuit_changed)
        self._hop = HopSender(
            settings, metrics, self.hosts, self.credentials, self.resolver,
            proxy=parent.url or None,
            proxy_headers=({"Proxy-Authorization": "Basic " + base64.b64encode(
                f"{parent.username}:{parent.password}".encode()).decode("ascii")}
                if parent.url and parent.username else None))
        self._hop.resumer = BodyResumer(settings.retry, metrics, self._send_get, self.request)
        self.tokens = RegistryTokens(self._fetch_uninjected, self.credentials)
        metrics.add_known_hosts(list(settings.address_overrides) +
                                [h for h in settings.limits if h != "default"] +
                                [c.host for c in settings.credentials])

    # -- lifecycle ----------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()  # system store, verification on, hostname check on
        paths = ssl.get_default_verify_paths()
        if not ((paths.cafile and os.path.exists(paths.cafile)) or
                (paths.capath and os.path.isdir(paths.capath) and os.listdir(paths.capath))):
            try:  # a slim image without a system store: Mozilla's bundle, if installed
                import certifi
                ctx.load_verify_locations(cafile=certifi.where())
            except (ImportError, OSError, ssl.SSLError):
                log.warning("no_system_ca_store", hint="set SSL_CERT_FILE or upstream.ca_bundle")
        for var, kind in (("SSL_CERT_FILE", "cafile"), ("SSL_CERT_DIR", "capath")):
            path = os.environ.get(var)
            if path and os.path.exists(path):
                try:
                    ctx.load_verify_locations(**{kind: path})
                except (ssl.SSLError, OSError) as exc:
                    log.warning("ca_load_failed", source=var, path=path, error=str(exc))
        if self.settings.ca_bundle:
            ctx.load_verify_locations(cafile=self.settings.ca_bundle)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def start(self) -> None:
        if self._session is not None:
            return
        s = self.settings
        self._ssl = self._ssl_context()
        connector = aiohttp.TCPConnector(
            # per-host concurrency of fetches is the limiter's; uploads take no limiter slot and
            # must not queue in the connector behind (or in front of) fetches either
            limit=0, limit_per_host=0, ssl=self._ssl, resolver=self.resolver,
            use_dns_cache=float(s.dns_cache_ttl) > 0,
            ttl_dns_cache=float(s.dns_cache_ttl) if float(s.dns_cache_ttl) > 0 else None,
            keepalive_timeout=float(s.keepalive_timeout))
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(), raise_for_status=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=float(s.connect_timeout),
                                          sock_read=float(s.read_timeout)))
        self._hop.session = self._session

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> "UpstreamClient":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def reconfigure(self, settings: UpstreamSettings) -> None:
        """Live reload (gateway.reload): credentials, retries, circuit and per-host limits apply
        to the next requests. The session (TLS trust, overrides, parent proxy) keeps its
        start-up settings; those keys need a restart."""
        self.settings = settings
        self.credentials = CredentialStore(settings.credentials)
        # every part that holds the settings or the credentials gets the new ones
        self._hop.settings = settings
        self._hop.credentials = self.credentials
        self._hop.resumer.retry = settings.retry  # type: ignore[union-attr]
        self.tokens.credentials = self.credentials
        self.hosts.reconfigure(settings)

    # -- seams for state shared by replicas (gateway/shared/) ------------------------------------
    def _circuit_changed(self, host: str, br: CircuitBreaker, old: str, new: str) -> None:
        # read at the transition: the shared state is wired after the host table exists
        if self.on_circuit_change is not None:
            self.on_circuit_change(host, br, old, new)

    @property
    def fleet_budget(self) -> Optional[Callable[[str, float], Awaitable[None]]]:
        """Asked for a token of the host's fleet budget before each attempt (may wait up to the
        given seconds; raises LimiterTimeout); None: this process alone. Lives on the hop sender,
        which takes the token."""
        return self._hop.fleet_budget

    @fleet_budget.setter
    def fleet_budget(self, take: Optional[Callable[[str, float], Awaitable[None]]]) -> None:
        self._hop.fleet_budget = take

    def breaker(self, host: str) -> CircuitBreaker:
        """The host's circuit breaker (created on first use): shared state opens it remotely."""
        return self.hosts.state(host).breaker

    # -- status ---------------------------------------------------------------------------------
    def circuit_remaining(self, host: str) -> Optional[float]:
        st = self.hosts.get(host)
        return st.breaker.remaining() if st else None

    def health(self) -> dict[str, dict]:
        """Per configured host; hosts not named in the configuration folded into ``other``."""
        return self.hosts.health()

    # -- failover helpers (for the cache layer) -------------------------------------------------
    def equivalents(self, registry: str, repository: str) -> list[tuple[str, str]]:
        return self.failover.equivalents(registry, repository)

    def record_failover(self, from_host: str, to_host: str) -> None:
        self.failover.record_failover(from_host, to_host)

    # -- tunnels -------------------------------------------------------------------------------
    async def open_tunnel(self, host: str, port: int
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await open_tunnel(self.settings, self.resolver, host, port)

    # -- requests ------------------------------------------------------------------------------
    async def request(self, req: UpstreamRequest) -> UpstreamResponse:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        loop = asyncio.get_running_loop()
        deadline = req.deadline if req.deadline is not None else \
            loop.time() + float(self.settings.retry.deadline)
        if req.registry_auth:
            return await self._registry_request(req, deadline)
        resp = await follow(self._hop.send, req, _clean_headers(req.headers), deadline)
        if resp.status == 401 and req.kind == "oci_auth":
            url = URL(req.url, encoded=True)
            if url.path == "/v2/" and url.host:
                self.tokens.learn_challenge(url_authority(url),
                                            resp.headers.get("WWW-Authenticate", ""))
        return resp

    async def _fetch_uninjected(self, req: UpstreamRequest) -> StreamedResponse:
        """For the token flow: redirects followed, no injected credentials."""
        loop = asyncio.get_running_loop()
        deadline = req.deadline if req.deadline is not None else \
            loop.time() + float(self.settings.retry.deadline)
        return await follow(self._hop.send, req, CIMultiDict(req.headers), deadline,
                            inject=False)

    async def _send_get(self, url: URL, headers: CIMultiDict, deadline: float,
                        kind: str) -> StreamedResponse:
        """For resumes: one GET hop, no injected credentials."""
        return await self._hop.send("GET", url, headers, None, deadline, kind=kind,
                                    inject=False)

    async def _registry_request(self, req: UpstreamRequest, deadline: float) -> UpstreamResponse:
        registry, repository = req.registry_auth  # type: ignore[misc]
        headers = _clean_headers(req.headers)
        headers.popall("Authorization", None)
        for attempt in range(2):
            try:
                auth = await self.tokens.authorization(registry, repository, deadline)
            except TokenFailed as tf:
                return tf.response  # the registry's / token endpoint's own answer (429, 5xx …)
            h = CIMultiDict(headers)
            if auth:
                h["Authorization"] = auth
            resp = await follow(self._hop.send, req, h, deadline, inject=False)
            if resp.status == 401 and attempt == 0 and \
                    url_authority(resp.url) == canonical_authority(registry):
                await resp.release()
                self.tokens.invalidate(registry, repository)
                log.info("registry_token_refresh", registry=registry, repository=repository)
                continue
            return resp
        raise AssertionError("unreachable")  # pragma: no cover


def _clean_headers(headers) -> CIMultiDict:
    out: CIMultiDict = CIMultiDict()
    for k, v in (headers or {}).items():
        if k.lower() not in _DROP_REQUEST_HEADERS:
            out.add(k, v)
    return out


__all__ = ["UpstreamClient"]
