"""The upstream client: one aiohttp session for every upstream host, made polite and resilient.

Per request (:meth:`UpstreamClient.request`), for each redirect hop:

1. circuit breaker of the hop's host (open: nothing is sent, :class:`UpstreamError` circuit_open);
2. per-host limiter: token bucket + concurrency cap + bounded FIFO queue (queue_full/queue_timeout);
3. send through the shared session (address overrides and SSRF guard in the resolver, verified
   TLS, parent proxy), time to headers bounded by the request deadline;
4. GET/HEAD are retried on connect errors, timeouts, 429 and 502/503/504 with exponential backoff
   and full jitter, honouring Retry-After (floored; a long one opens the circuit instead of
   sleeping), always within the deadline. A status that is still bad after the last try is
   *returned* (the cache may serve stale); an error raises;
5. an exhausted primary rate limit (403/429 with ``X-RateLimit-Remaining: 0`` and an
   ``X-RateLimit-Reset`` in the future, GitHub's) is treated like a long Retry-After: the
   response is returned without retry and the host's circuit opens until the reset (or for the
   response's Retry-After, if it has one), capped by ``circuit.max_open_for``; meanwhile clients
   without a cached answer get 429 with Retry-After. Secondary rate limits (Retry-After without an
   exhausted budget, on a 429 *or a 403*, which is how GitHub answers them) go through the
   Retry-After handling of step 4, counted as ``status_429`` retries.

The response body streams; with ``resumable`` a body cut mid-way is resumed with ``Range``.
"""
from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import ssl
import time
from dataclasses import replace
from typing import AsyncIterator, Awaitable, Callable, Optional
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from ..hostport import canonical_authority, url_authority
from ..observability.logging import get_logger
from ..observability.metrics import CIRCUIT_STATES, Metrics
from ..settings import UpstreamSettings
from .circuit import CircuitBreaker, CircuitOpen
from .credentials import CredentialStore
from .failover import Failover
from .limiter import HostLimiter, LimiterFull, LimiterTimeout
from .registry_auth import RegistryTokens, TokenFailed
from .resolver import AddressGuard, GuardRefused, OverrideResolver, is_ip
from .retry_after import (parse_retry_after_body, parse_retry_after_header,
                          rate_limit_reset_in)
from .tunnel import open_tunnel
from .types import UpstreamError, UpstreamRequest, UpstreamResponse

log = get_logger("gateway.upstream")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: statuses with which an upstream reports an exhausted rate limit (X-RateLimit-Remaining: 0)
RATE_LIMIT_STATUSES = frozenset({403, 429})
#: a redirect target (another host) answering one of these makes the origin be asked once more
REASK_STATUSES = frozenset({401, 403, 404, 410})
MAX_REDIRECTS = 5
#: error bodies of retryable statuses are read up front (Retry-After hints, retries) up to this
ERROR_BODY_LIMIT = 64 * 1024
#: request headers never passed on (the session computes them, or they are hop-by-hop)
_DROP_REQUEST_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive",
    "proxy-connection", "proxy-authorization", "proxy-authenticate", "te", "trailer", "upgrade",
})
#: aiohttp would add these itself; the gateway passes the client's own (or none)
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def _safe_url(url: URL | str) -> str:
    """URL for logs and messages: no query (signed CDN URLs carry signatures there)."""
    u = url if isinstance(url, URL) else URL(url, encoded=True)
    return str(u.with_query(None).with_fragment(None)) + ("?…" if u.raw_query_string else "")


class _HostState:
    def __init__(self, host: str, client: "UpstreamClient") -> None:
        self.host = host
        self.label = client.metrics.host_label(host)
        m = client.metrics
        label = self.label

        def limiter_changed(lim: HostLimiter) -> None:
            m.upstream_queue_depth.labels(host=label).set(lim.queue_depth)
            m.upstream_connections.labels(host=label).set(lim.in_flight)
            m.upstream_rate.labels(host=label).set(lim.rate)

        def circuit_changed(br: CircuitBreaker, old: str, new: str) -> None:
            m.circuit_state.labels(host=label).set(CIRCUIT_STATES[new])
            log.warning("circuit_transition", host=host, old=old, new=new, why=br.why or None,
                        remaining_seconds=round(br.remaining() or 0.0, 3))
            if client.on_circuit_change is not None:
                client.on_circuit_change(host, br, old, new)

        self.limiter = HostLimiter(host, client.settings.limit_for(host),
                                   on_change=limiter_changed)
        self.breaker = CircuitBreaker(host, client.settings.circuit, on_change=circuit_changed)
        m.circuit_state.labels(host=label).set(0)
        m.upstream_rate.labels(host=label).set(self.limiter.rate)
        self.last_status: Optional[int] = None
        self.last_error: Optional[str] = None
        self.last_at: Optional[float] = None
        self.requests = 0
        self.responses = 0
        self.errors = 0
        self.retries = 0
        self.resumes = 0


class _Response(UpstreamResponse):
    """What :meth:`UpstreamClient.request` returns: head + body stream (buffered or live)."""

    def __init__(self, client: "UpstreamClient", st: _HostState, resp: aiohttp.ClientResponse,
                 url: URL, hop_headers: CIMultiDict) -> None:
        self._client = client
        self._st = st
        self._resp: Optional[aiohttp.ClientResponse] = resp
        self._slot_held = True
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers = resp.headers
        self.url = str(url)
        self._yurl = url
        self.history: tuple[tuple[int, str], ...] = ()
        self._hop_headers = hop_headers
        self._prefix = b""
        self._prefix_only = False     # the whole body is in _prefix
        self._reached = 0
        self._complete = False
        self._consumed = False
        self.resumes = 0
        # resume context, set by UpstreamClient.request
        self._origin: Optional[UpstreamRequest] = None
        self._resumable = False
        self._expected: Optional[int] = None
        self._validator: Optional[str] = None

    # -- internals ------------------------------------------------------------------------
    async def _buffer_small(self, limit: int, deadline: float) -> bool:
        """Read the body into memory if it is at most ``limit`` bytes; keep what was read."""
        assert self._resp is not None
        buf = bytearray()
        try:
            async with asyncio.timeout_at(deadline):
                while len(buf) <= limit:
                    chunk = await self._resp.content.readany()
                    if not chunk:
                        self._prefix = bytes(buf)
                        self._prefix_only = True
                        self._complete = True
                        self._drop_connection(reuse=True)
                        return True
                    buf.extend(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            self._prefix = bytes(buf)
            self._prefix_only = True  # what arrived is all there is
            self._drop_connection(reuse=False)
            return True
        self._prefix = bytes(buf)
        return False

    def _drop_connection(self, reuse: bool) -> None:
        if self._resp is not None:
            if reuse:
                self._resp.release()
            else:
                self._resp.close()
            self._resp = None
        if self._slot_held:
            self._slot_held = False
            self._st.limiter.release()

    def _adopt(self, other: "_Response") -> None:
        """Take over the live body of a resumed response."""
        self._resp, other._resp = other._resp, None
        self._slot_held, other._slot_held = other._slot_held, False
        self._st = other._st
        self._prefix, self._prefix_only = other._prefix, other._prefix_only
        self._complete = other._complete

    # -- public ---------------------------------------------------------------------------
    async def iter_chunks(self) -> AsyncIterator[bytes]:
        if self._consumed:
            raise RuntimeError("the body of this response was already consumed")
        self._consumed = True
        try:
            while True:
                if self._prefix:
                    data, self._prefix = self._prefix, b""
                    self._reached += len(data)
                    yield data
                if self._prefix_only or self._resp is None:
                    break
                try:
                    chunk = await self._resp.content.readany()
                    if not chunk and self._expected is not None and self._reached < self._expected:
                        raise aiohttp.ClientPayloadError(
                            f"body ended after {self._reached} of {self._expected} bytes")
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                        asyncio.TimeoutError, ConnectionError) as exc:
                    await self._client._resume(self, exc)
                    continue
                if not chunk:
                    self._complete = True
                    break
                self._reached += len(chunk)
                yield chunk
        finally:
            await self.release()

    async def read(self, limit: int = 16 * 1024 * 1024) -> bytes:
        out = bytearray()
        async for chunk in self.iter_chunks():
            out.extend(chunk)
            if len(out) > limit:
                await self.release()
                raise UpstreamError("body", self._st.host,
                                    f"body of {_safe_url(self.url)} exceeds {limit} bytes",
                                    status=502)
        return bytes(out)

    async def release(self) -> None:
        self._drop_connection(reuse=self._complete)

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {_safe_url(self.url)}>"

    def __del__(self) -> None:
        # safety net for a caller that neither consumed nor released the body: give the
        # host's concurrency slot back so the limiter cannot leak capacity
        if getattr(self, "_slot_held", False):
            try:
                self._drop_connection(reuse=False)
            except Exception:  # noqa: BLE001 - interpreter shutdown, no loop
                pass


class UpstreamClient:
    def __init__(self, settings: UpstreamSettings, metrics: Metrics, *,
                 address_guard: Optional[AddressGuard] = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._guard = address_guard
        self._hosts: dict[str, _HostState] = {}
        self._session: Optional[aiohttp.ClientSession] = None
        self._ssl: Optional[ssl.SSLContext] = None
        self.credentials = CredentialStore(settings.credentials)
        self.failover = Failover(settings.failover_groups, metrics)
        #: seams for state shared by replicas (gateway/shared/, wired by the app; None: this
        #: process alone): told of every circuit transition, and asked for a token of the
        #: host's fleet budget (may wait up to the given seconds; raises LimiterTimeout)
        self.on_circuit_change: Optional[Callable[[str, CircuitBreaker, str, str], None]] = None
        self.fleet_budget: Optional[Callable[[str, float], Awaitable[None]]] = None
        self.tokens = RegistryTokens(self)
        parent = settings.parent_proxy
        self._proxy: Optional[str] = parent.url or None
        self._proxy_headers = (
            {"Proxy-Authorization": "Basic " + base64.b64encode(
                f"{parent.username}:{parent.password}".encode()).decode("ascii")}
            if parent.url and parent.username else None)
        proxy_host = urlsplit(parent.url).hostname if parent.url else None
        self.resolver = OverrideResolver(settings.address_overrides, address_guard,
                                         trusted_hosts=(proxy_host,) if proxy_host else ())
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

    def _per_host_cap(self) -> int:
        caps = [lim.max_concurrency for lim in self.settings.limits.values()]
        if "default" not in self.settings.limits:
            caps.append(self.settings.limit_for("\0").max_concurrency)
        return max(caps or [16])

    async def start(self) -> None:
        if self._session is not None:
            return
        s = self.settings
        self._ssl = self._ssl_context()
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self._per_host_cap(), ssl=self._ssl, resolver=self.resolver,
            use_dns_cache=float(s.dns_cache_ttl) > 0,
            ttl_dns_cache=float(s.dns_cache_ttl) if float(s.dns_cache_ttl) > 0 else None,
            keepalive_timeout=float(s.keepalive_timeout))
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(), raise_for_status=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=float(s.connect_timeout),
                                          sock_read=float(s.read_timeout)))

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> "UpstreamClient":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- status ---------------------------------------------------------------------------------
    def _host(self, host: str) -> _HostState:
        host = host.lower()
        st = self._hosts.get(host)
        if st is None:
            st = self._hosts[host] = _HostState(host, self)
        return st

    def breaker(self, host: str) -> CircuitBreaker:
        """The host's circuit breaker (created on first use): shared state opens it remotely."""
        return self._host(host).breaker

    def circuit_remaining(self, host: str) -> Optional[float]:
        st = self._hosts.get(host.lower())
        return st.breaker.remaining() if st else None

    def health(self) -> dict[str, dict]:
        out = {}
        for host, st in sorted(self._hosts.items()):
            info = st.breaker.snapshot()
            lim = st.limiter
            info.update({
                "rate": round(lim.current_rate(), 4),
                "configured_rate": lim.cfg.rate,
                "queue_depth": lim.queue_depth,
                "in_flight": lim.in_flight,
                "max_concurrency": lim.cfg.max_concurrency,
                "last_status": st.last_status,
                "last_error": st.last_error,
                "last_seconds_ago": (round(time.monotonic() - st.last_at, 1)
                                     if st.last_at else None),
                "requests": st.requests, "responses": st.responses, "errors": st.errors,
                "retries": st.retries, "resumed": st.resumes,
                "queue_rejected": lim.rejected_full, "queue_timeouts": lim.timed_out,
            })
            out[host] = info
        return out

    # -- failover helpers (for the cache layer) -------------------------------------------------
    def equivalents(self, registry: str, repository: str) -> list[tuple[str, str]]:
        return self.failover.equivalents(registry, repository)

    def record_failover(self, from_host: str, to_host: str) -> None:
        self.failover.record_failover(from_host, to_host)

    # -- tunnels -------------------------------------------------------------------------------
    async def open_tunnel(self, host: str, port: int
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await open_tunnel(self, host, port)

    # -- requests ------------------------------------------------------------------------------
    async def request(self, req: UpstreamRequest) -> UpstreamResponse:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        loop = asyncio.get_running_loop()
        deadline = req.deadline if req.deadline is not None else \
            loop.time() + float(self.settings.retry.deadline)
        if req.registry_auth:
            resp = await self._registry_request(req, deadline)
        else:
            resp = await self._follow(req, _clean_headers(req.headers), deadline)
            if resp.status == 401 and req.kind == "oci_auth":
                url = URL(req.url, encoded=True)
                if url.path == "/v2/" and url.host:
                    self.tokens.learn_challenge(url_authority(url),
                                                resp.headers.get("WWW-Authenticate", ""))
        return resp

    async def _registry_request(self, req: UpstreamRequest, deadline: float) -> _Response:
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
            resp = await self._follow(req, h, deadline, inject=False)
            if resp.status == 401 and attempt == 0 and \
                    url_authority(resp.url) == canonical_authority(registry):
                await resp.release()
                self.tokens.invalidate(registry, repository)
                log.info("registry_token_refresh", registry=registry, repository=repository)
                continue
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    async def _follow(self, req: UpstreamRequest, headers: CIMultiDict, deadline: float, *,
                      inject: bool = True) -> _Response:
        url = URL(req.url, encoded=True)
        if url.scheme not in ("http", "https") or not url.host:
            raise UpstreamError("protocol", url.host or "", f"unsupported URL {_safe_url(url)}",
                                status=502)
        method = req.method.upper()
        body = req.body
        history: list[tuple[int, str]] = []
        origin_url, origin_headers, origin_method = url, headers, method
        reasked = False
        while True:
            resp = await self._send(method, url, headers, body, deadline, kind=req.kind,
                                    inject=inject)
            location = resp.headers.get("Location")
            if (history and not reasked and resp.status in REASK_STATUSES and body is None
                    and url_authority(url) != url_authority(origin_url)):
                # A redirect target refused the URL it was sent to: typically a signed CDN URL
                # whose signature expired on the way (ghcr.io → pkg-containers). Ask the origin
                # once more for a fresh one.
                reasked = True
                log.info("upstream_reask_origin", host=url.host, status=resp.status,
                         origin=_safe_url(origin_url))
                await resp.release()
                url, headers, method = origin_url, origin_headers, origin_method
                history.clear()
                continue
            if not (req.follow_redirects and resp.status in REDIRECT_STATUSES and location):
                break
            if len(history) >= MAX_REDIRECTS:
                await resp.release()
                raise UpstreamError("protocol", url.host or "",
                                    f"more than {MAX_REDIRECTS} redirects from {_safe_url(req.url)}",
                                    status=502)
            try:
                new = url.join(URL(location, encoded=True))
            except ValueError:
                break
            if new.scheme not in ("http", "https") or not new.host:
                break
            if resp.status in (307, 308) and body is not None:
                break  # a streamed body cannot be sent twice: hand the redirect to the caller
            await resp.release()
            history.append((resp.status, location))
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method = "HEAD" if method == "HEAD" else "GET"
                body = None
            if url_authority(new) != url_authority(url):  # another origin (host, port)
                headers = CIMultiDict(headers)
                headers.popall("Authorization", None)
                headers.popall("Cookie", None)
            log.debug("redirect", status=resp.status, from_url=_safe_url(url),
                      to_url=_safe_url(new))
            url = new
        resp.history = tuple(history)
        resp._origin = req
        if (req.resumable and method == "GET" and resp.status == 200
                and resp._resp is not None):
            length = resp.headers.get("Content-Length")
            etag = resp.headers.get("ETag")
            validator = etag if etag and not etag.startswith("W/") else \
                resp.headers.get("Last-Modified")
            if length and length.isdigit():
                resp._expected = int(length)
            resp._resumable = resp._expected is not None or bool(validator)
            resp._validator = validator
        return resp

    # -- one hop, with retries ---------------------------------------------------------------
    async def _send(self, method: str, url: URL, headers: CIMultiDict, body, deadline: float, *,
                    kind: str = "generic", inject: bool = True) -> _Response:
        # circuits, limiters, credentials and metric labels are per origin: host[:port]
        host = url_authority(url)
        st = self._host(host)
        st.requests += 1
        retry = self.settings.retry
        idempotent = method in ("GET", "HEAD") and body is None
        attempts = retry.attempts if idempotent else 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        last: Optional[_Response] = None
        hop_headers = CIMultiDict(headers)
        if "User-Agent" not in hop_headers and self.settings.user_agent_suffix:
            hop_headers["User-Agent"] = self.settings.user_agent_suffix
        if inject and "Authorization" not in hop_headers:
            cred = self.credentials.authorization(host)
            if cred:
                hop_headers["Authorization"] = cred
        if url.host and is_ip(url.host):
            why = self.resolver.check_literal(url.host)
            if why:
                raise UpstreamError("ssrf", host, f"connection to {host} refused: {why}",
                                    status=403)
        attempt = 0
        while True:
            try:
                probe = st.breaker.admit()
            except CircuitOpen as co:
                if last is not None:
                    return last
                raise UpstreamError("circuit_open", host, co.message, status=co.status,
                                    retry_after=max(1.0, co.remaining)) from None
            try:
                resp = await self._attempt(st, method, url, hop_headers, body, deadline)
            except _AttemptFailed as af:
                final = (af.reason == "deadline" or not af.retryable or probe
                         or attempt + 1 >= attempts)
                cut_by_deadline = af.reason == "deadline"
                delay = 0.0
                if not final:
                    delay = self._backoff(attempt)
                    if loop.time() + delay >= deadline:
                        final = cut_by_deadline = True
                if not final:
                    self._count_retry(st, af.reason, attempt, delay, url)
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                if af.upstream_fault:
                    st.breaker.failure(None, af.message, probe=probe)
                elif probe:
                    st.breaker.probe_abandoned()
                if last is not None:
                    return last  # a bad status earlier beats an error now
                if cut_by_deadline:
                    msg = af.message if af.reason == "deadline" else (
                        f"no response from {host} within the {deadline - started:.1f}s deadline "
                        f"after {attempt + 1} attempt(s); last error: {af.message}")
                    raise UpstreamError("deadline", host, msg, status=504) from None
                raise UpstreamError(af.reason, host, af.message, status=af.status) from None
            except UpstreamError:
                # queue_full / queue_timeout from the limiter
                if probe:
                    st.breaker.probe_abandoned()
                if last is not None:
                    return last
                raise
            except BaseException:
                if probe:
                    st.breaker.probe_abandoned()
                raise

            # a response head arrived
            r = _Response(self, st, resp, url, hop_headers)
            try:
                outcome = await self._judge(st, r, attempt, attempts, idempotent, probe,
                                            deadline, kind)
            except BaseException:
                r._drop_connection(reuse=False)
                if probe:
                    st.breaker.probe_abandoned()
                raise
            if outcome is not None:
                return outcome
            last = r
            attempt += 1

    async def _judge(self, st: _HostState, r: _Response, attempt: int, attempts: int,
                     idempotent: bool, probe: bool, deadline: float, kind: str
                     ) -> Optional[_Response]:
        """Decide about a response head: return it (final) or sleep and return None (retry)."""
        retry = self.settings.retry
        status = r.status
        host, url = st.host, r._yurl
        if status in RATE_LIMIT_STATUSES:
            reset_in = rate_limit_reset_in(r.headers)
            if reset_in is not None:
                await self._rate_limited(st, r, reset_in, deadline, kind)
                return r
        # a 403 that carries Retry-After is a throttle, not a refusal (GitHub's secondary rate
        # limits answer 403 or 429 with Retry-After while X-RateLimit-Remaining is left)
        throttled = status == 429 or (status == 403 and "Retry-After" in r.headers)
        if status not in RETRY_STATUSES and not throttled:
            if status >= 500:
                st.breaker.failure(status, f"status {status}", probe=probe)
            else:
                st.breaker.success(probe=probe)
            return r
        # 403+Retry-After / 429 / 502 / 503 / 504: the error body is small, read it (hints, and
        # it can be kept)
        buffered = await r._buffer_small(ERROR_BODY_LIMIT, deadline)
        ra = parse_retry_after_header(r.headers.get("Retry-After"))
        if ra is None and r._prefix and status in (429, 503):
            ra = parse_retry_after_body(r._prefix)
        if ra is not None:
            self.metrics.upstream_retry_after.labels(host=st.label).observe(ra)
        if throttled:
            st.limiter.on_throttled()
        if ra is not None and (ra > retry.retry_after_max or
                               ((throttled or status == 503) and
                                ra >= self.settings.circuit.long_retry_after)):
            window = st.breaker.open_for_retry_after(ra, status)
            log.warning("upstream_pushback", host=host, status=status, retry_after=ra,
                        circuit_open_seconds=window, url=_safe_url(url), kind=kind)
            return r
        if probe:
            st.breaker.failure(status, f"status {status}", probe=True)
            return r
        delay = self._backoff(attempt)
        if ra is not None:
            delay = max(delay, ra, float(retry.retry_after_min))
        loop = asyncio.get_running_loop()
        if (attempt + 1 >= attempts or not buffered or not idempotent
                or loop.time() + delay >= deadline):
            st.breaker.failure(status, f"status {status}")
            return r
        self._count_retry(st, "status_429" if throttled else "status_5xx", attempt,
                          delay, url, retry_after=ra)
        await asyncio.sleep(delay)
        return None

    async def _rate_limited(self, st: _HostState, r: _Response, reset_in: float,
                            deadline: float, kind: str) -> None:
        """The host's rate limit is exhausted until the reset: no retry, the circuit opens."""
        await r._buffer_small(ERROR_BODY_LIMIT, deadline)  # small error body, kept
        ra = parse_retry_after_header(r.headers.get("Retry-After"))
        wait = ra if ra is not None else reset_in
        self.metrics.upstream_retry_after.labels(host=st.label).observe(wait)
        st.limiter.on_throttled()
        source = "Retry-After" if ra is not None else "X-RateLimit-Reset in"
        window = st.breaker.open_for_rate_limit(
            wait, r.status, f"rate limit exhausted (X-RateLimit-Remaining: 0, {source} {wait:.0f}s)")
        log.warning("upstream_rate_limited", host=st.host, status=r.status, retry_after=ra,
                    reset_in=round(reset_in, 3), circuit_open_seconds=round(window, 3),
                    url=_safe_url(r._yurl), kind=kind)

    def _backoff(self, attempt: int) -> float:
        r = self.settings.retry
        return random.uniform(0, min(float(r.max_delay), float(r.base_delay) * (2 ** attempt)))

    def _count_retry(self, st: _HostState, reason: str, attempt: int, delay: float, url: URL,
                     retry_after: Optional[float] = None) -> None:
        st.retries += 1
        self.metrics.upstream_retries.labels(host=st.label, reason=reason).inc()
        log.info("upstream_retry", host=st.host, reason=reason, attempt=attempt + 1,
                 delay=round(delay, 3), retry_after=retry_after, url=_safe_url(url))

    async def _attempt(self, st: _HostState, method: str, url: URL, headers: CIMultiDict, body,
                       deadline: float) -> aiohttp.ClientResponse:
        """One try: limiter slot, then the request; returns the live response (slot held)."""
        assert self._session is not None
        loop = asyncio.get_running_loop()
        host = st.host
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise _AttemptFailed("deadline", f"deadline passed before a request to {host} "
                                 "could be sent", 504, False, upstream_fault=False)
        qt = float(st.limiter.cfg.queue_timeout)
        try:
            if self.fleet_budget is not None:
                await self.fleet_budget(host, min(qt, remaining))
            waited = await st.limiter.acquire(min(qt, remaining))
        except LimiterFull:
            raise UpstreamError(
                "queue_full", host, f"too many requests waiting for {host} "
                f"({st.limiter.cfg.queue_size} queued); try again shortly", status=503,
                retry_after=1.0) from None
        except LimiterTimeout:
            if qt < remaining:
                raise UpstreamError(
                    "queue_timeout", host, f"waited {qt:.1f}s for a free slot to {host} "
                    f"(rate {st.limiter.rate:.2f}/s, {st.limiter.cfg.max_concurrency} at a time)",
                    status=503, retry_after=1.0) from None
            raise _AttemptFailed("deadline", f"deadline reached while queued for {host}",
                                 504, False, upstream_fault=False) from None
        self.metrics.upstream_queue_wait.labels(host=st.label).observe(waited)
        use_proxy = (self._proxy and self.resolver.override_for(url.host or "", url.port) is None
                     and not self.settings.parent_proxy.bypasses(url.host or ""))
        t0 = loop.time()
        cm = asyncio.timeout_at(deadline)
        try:
            async with cm:
                resp = await self._session.request(
                    method, url, headers=headers, data=body, allow_redirects=False,
                    proxy=self._proxy if use_proxy else None,
                    proxy_headers=self._proxy_headers if use_proxy else None)
        except BaseException as exc:
            st.limiter.release()
            if isinstance(exc, asyncio.CancelledError) and not cm.expired():
                raise
            failed = _classify(exc, host, cm.expired(), deadline - t0)
            st.errors += 1
            st.last_error = failed.message
            st.last_at = time.monotonic()
            self.metrics.upstream_responses.labels(host=st.label, status="error").inc()
            log.info("upstream_error", host=host, reason=failed.reason, error=failed.message,
                     url=_safe_url(url))
            raise failed from None
        self.metrics.upstream_latency.labels(host=st.label).observe(loop.time() - t0)
        self.metrics.upstream_responses.labels(host=st.label, status=str(resp.status)).inc()
        st.responses += 1
        st.last_status = resp.status
        st.last_at = time.monotonic()
        return resp

    # -- resume ------------------------------------------------------------------------------
    async def _resume(self, r: _Response, exc: BaseException) -> None:
        """Continue a broken body with Range from the byte reached, or raise UpstreamError."""
        host = r._st.host
        reached = r._reached
        what = f"{type(exc).__name__}: {exc}".strip(": ")
        if not r._resumable or r.resumes >= self.settings.retry.resume_attempts:
            r._drop_connection(reuse=False)
            why = "not resumable" if not r._resumable else \
                f"{r.resumes} resume(s) already tried"
            raise UpstreamError("body", host, f"body of {_safe_url(r.url)} broke after {reached} "
                                f"bytes ({what}); {why}", status=502) from None
        r.resumes += 1
        r._st.resumes += 1
        self.metrics.resumed_downloads.labels(host=r._st.label).inc()
        self.metrics.upstream_retries.labels(host=r._st.label, reason="body").inc()
        log.warning("upstream_resume", host=host, url=_safe_url(r.url), reached=reached,
                    expected=r._expected, attempt=r.resumes, error=what)
        r._drop_connection(reuse=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(self.settings.retry.deadline)
        origin = r._origin
        assert origin is not None
        extra = CIMultiDict({"Range": f"bytes={reached}-"})
        if r._validator:
            extra["If-Range"] = r._validator
        headers = CIMultiDict(r._hop_headers)
        for k in ("Range", "If-Range"):
            headers.popall(k, None)
        headers.extend(extra)
        final = r._yurl
        origin_url = URL(origin.url, encoded=True)
        try:
            new = await self._send("GET", final, headers, None, deadline, kind=origin.kind,
                                   inject=False)
            if new.status in (401, 403, 404, 410) and final != origin_url:
                # e.g. the signed CDN URL expired: ask the origin again for a fresh one
                log.info("upstream_resume_from_origin", host=host, status=new.status,
                         origin=_safe_url(origin_url))
                await new.release()
                oh = CIMultiDict(origin.headers)
                for k in ("Range", "If-Range"):
                    oh.popall(k, None)
                oh.extend(extra)
                again = replace(origin, headers=oh, follow_redirects=True, deadline=deadline,
                                resumable=False)
                new = await self.request(again)  # type: ignore[assignment]
        except UpstreamError as err:
            raise UpstreamError("body", err.host, f"resuming {_safe_url(r.url)} at byte {reached} "
                                f"failed: {err.message}", status=502) from None
        ok, why = _check_partial(new, reached, r._expected)
        if not ok:
            await new.release()
            raise UpstreamError("body", host, f"cannot resume {_safe_url(r.url)} at byte "
                                f"{reached}: {why}", status=502)
        r._adopt(new)  # type: ignore[arg-type]
        r.url, r._yurl = new.url, URL(new.url, encoded=True)
        r._hop_headers = new._hop_headers  # type: ignore[attr-defined]


def _check_partial(new: UpstreamResponse, reached: int, expected: Optional[int]
                   ) -> tuple[bool, str]:
    if new.status == 200:
        return False, "the upstream answered 200 (whole body, Range ignored or validator changed)"
    if new.status != 206:
        return False, f"the upstream answered {new.status} to the Range request"
    m = _CONTENT_RANGE.match(new.headers.get("Content-Range", ""))
    if not m:
        return False, f"206 without a usable Content-Range ({new.headers.get('Content-Range')!r})"
    start, total = int(m.group(1)), m.group(3)
    if start != reached:
        return False, f"206 starts at byte {start}, expected {reached}"
    if expected is not None and total != "*" and int(total) != expected:
        return False, f"206 says total {total} bytes, the original said {expected}"
    return True, ""


class _AttemptFailed(Exception):
    def __init__(self, reason: str, message: str, status: int, retryable: bool, *,
                 upstream_fault: Optional[bool] = None) -> None:
        super().__init__(message)
        #: whether this counts against the host's circuit (our own queue does not, nor SSRF)
        self.upstream_fault = reason != "ssrf" if upstream_fault is None else upstream_fault
        self.reason = reason
        self.message = message
        self.status = status
        self.retryable = retryable


def _classify(exc: BaseException, host: str, deadline_hit: bool, budget: float
              ) -> _AttemptFailed:
    if deadline_hit:
        return _AttemptFailed("deadline", f"no response from {host} within the deadline "
                              f"({budget:.1f}s left when the attempt started)", 504, False)
    if isinstance(exc, aiohttp.ClientConnectorDNSError) and isinstance(exc.os_error, GuardRefused):
        return _AttemptFailed("ssrf", str(exc.os_error), 403, False)
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError,
                        ssl.SSLError)):
        return _AttemptFailed("tls", f"TLS with {host} failed: {exc}", 502, False)
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return _AttemptFailed("connect", f"parent proxy refused CONNECT to {host}: "
                              f"{exc.status} {exc.message}", 502, True)
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return _AttemptFailed("timeout", f"timed out talking to {host}: "
                              f"{type(exc).__name__} {exc}".strip(), 504, True)
    if isinstance(exc, aiohttp.ClientResponseError):
        return _AttemptFailed("protocol", f"bad response from {host}: {exc}", 502, True)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return _AttemptFailed("connect", f"cannot reach {host}: {type(exc).__name__}: {exc}",
                              502, True)
    return _AttemptFailed("protocol", f"request to {host} failed: {type(exc).__name__}: {exc}",
                          502, False)


def _clean_headers(headers) -> CIMultiDict:
    out: CIMultiDict = CIMultiDict()
    for k, v in (headers or {}).items():
        if k.lower() not in _DROP_REQUEST_HEADERS:
            out.add(k, v)
    return out


__all__ = ["UpstreamClient"]
