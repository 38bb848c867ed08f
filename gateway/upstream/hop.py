"""One hop (one URL) with its retries: circuit, limiter slot, send, decide, carry out.

For each attempt: the host's circuit breaker admits it (open: nothing is sent, ``circuit_open``);
a fetch takes a token and a concurrency slot of the host's limiter (``queue_full`` /
``queue_timeout``); the request goes through the shared aiohttp session, time to headers bounded
by the request deadline. A connect error or timeout of an idempotent request is retried with
jittered backoff; a response head is judged by :func:`~gateway.upstream.decide.decide` (retry,
push back, rate limited, accept). A status still bad after the last try is *returned* (the cache
may serve stale); an error raises :class:`UpstreamError`.

Only the upstream's own faults count against it: our queue, the SSRF guard, the deadline while
queued, and anything caused by the client's request body (:class:`ClientBodyError`, or a client
that never finished its upload) leave the circuit and /api/status alone.
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import AsyncIterable, Awaitable, Callable, Optional

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from ..hostport import url_authority
from ..observability.logging import get_logger
from ..observability.metrics import Metrics
from ..settings import UpstreamSettings
from .circuit import CircuitOpen
from .credentials import CredentialStore
from .decide import RATE_LIMIT_STATUSES, Action, Facts, Verdict, decide, needs_body
from .failure import AttemptFailed, classify
from .hosts import HostState, HostTable
from .limiter import LimiterFull, LimiterTimeout
from .resolver import OverrideResolver, is_ip
from .response import Resumer, StreamedResponse, safe_url
from .retry_after import rate_limit_reset_in
from .types import Reason, UpstreamError

log = get_logger("gateway.upstream")

#: error bodies of retryable statuses are read up front (Retry-After hints, retries) up to this
ERROR_BODY_LIMIT = 64 * 1024


class UploadBody:
    """A request body passed through to aiohttp, remembering whether the client finished it."""

    def __init__(self, source: AsyncIterable[bytes]) -> None:
        self._it = source.__aiter__()
        self.finished = False

    def __aiter__(self) -> "UploadBody":
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            self.finished = True
            raise


class HopSender:
    """Sends one hop; owns nothing but the wiring (session, hosts, credentials, resolver)."""

    def __init__(self, settings: UpstreamSettings, metrics: Metrics, hosts: HostTable,
                 credentials: CredentialStore, resolver: OverrideResolver,
                 proxy: Optional[str], proxy_headers: Optional[dict]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.hosts = hosts
        self.credentials = credentials
        self.resolver = resolver
        self.proxy = proxy
        self.proxy_headers = proxy_headers
        #: set by the client: the shared session (start) and how broken bodies are resumed
        self.session: Optional[aiohttp.ClientSession] = None
        self.resumer: Optional[Resumer] = None
        #: set by the client when replicas share state (gateway/shared/; None: this process
        #: alone): one token of the host's fleet budget, waiting at most the given seconds
        #: (raises LimiterTimeout), taken before the host's own limiter
        self.fleet_budget: Optional[Callable[[str, float], Awaitable[None]]] = None

    def hop_headers(self, url: URL, headers: CIMultiDict, inject: bool) -> CIMultiDict:
        """The headers this hop is sent with: a User-Agent, and credentials only over https."""
        host = url_authority(url)  # credentials are per origin: host[:port]
        out = CIMultiDict(headers)
        if "User-Agent" not in out and self.settings.user_agent_suffix:
            out["User-Agent"] = self.settings.user_agent_suffix
        if url.scheme != "https":
            # credentials never travel in cleartext: neither the configured ones nor a client's
            if out.popall("Authorization", None):
                log.info("upstream_plain_http_authorization_dropped", host=host)
        elif inject and "Authorization" not in out:
            cred = self.credentials.authorization(host)
            if cred:
                out["Authorization"] = cred
        return out

    async def send(self, method: str, url: URL, headers: CIMultiDict,
                   body: Optional[AsyncIterable[bytes]], deadline: float, *,
                   kind: str = "generic", inject: bool = True) -> StreamedResponse:
        # circuits, limiters, credentials and metric labels are per origin: host[:port]
        host = url_authority(url)
        st = self.hosts.state(host)
        st.requests += 1
        idempotent = method in ("GET", "HEAD") and body is None
        attempts = self.settings.retry.attempts if idempotent else 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        last: Optional[StreamedResponse] = None
        hop_headers = self.hop_headers(url, headers, inject)
        upload = UploadBody(body) if body is not None else None
        if url.host and is_ip(url.host):
            why = self.resolver.check_literal(url.host)
            if why:
                raise UpstreamError(Reason.SSRF, host, f"connection to {host} refused: {why}",
                                    status=403)
        attempt = 0
        while True:
            try:
                probe = st.breaker.admit()
            except CircuitOpen as co:
                if last is not None:
                    return last
                raise UpstreamError(Reason.CIRCUIT_OPEN, host, co.message, status=co.status,
                                    retry_after=max(1.0, co.remaining)) from None
            try:
                resp = await self._attempt(st, method, url, hop_headers, upload, deadline)
            except AttemptFailed as af:
                final = (af.reason == Reason.DEADLINE or not af.retryable or probe
                         or attempt + 1 >= attempts)
                cut_by_deadline = af.reason == Reason.DEADLINE
                delay = 0.0
                if not final:
                    delay = self.backoff(attempt)
                    if loop.time() + delay >= deadline:
                        final = cut_by_deadline = True
                if not final:
                    self._count_retry(st, af.reason, attempt, delay, url, quiet=True)
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                if af.upstream_fault:
                    # one line per failed request (its attempts are debug lines)
                    log.info("upstream_error", host=host, reason=af.reason, error=af.message,
                             attempts=attempt + 1, url=safe_url(url))
                    st.request_failed(None, af.message, probe=probe)
                elif probe:
                    st.breaker.probe_abandoned()
                if last is not None:
                    return last  # a bad status earlier beats an error now
                if cut_by_deadline:
                    msg = af.message if af.reason == Reason.DEADLINE else (
                        f"no response from {host} within the {deadline - started:.1f}s deadline "
                        f"after {attempt + 1} attempt(s); last error: {af.message}")
                    raise UpstreamError(Reason.DEADLINE, host, msg, status=504) from None
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
            assert self.resumer is not None
            r = StreamedResponse(st, resp, url, hop_headers, self.resumer,
                                 slot_held=upload is None)
            try:
                verdict = await self._judge(st, r, attempt, attempts, idempotent, probe,
                                            deadline)
                await self._carry_out(st, r, verdict, probe, kind)
            except BaseException:
                r.drop_connection(reuse=False)
                if probe:
                    st.breaker.probe_abandoned()
                raise
            if verdict.action != Action.RETRY:
                return r
            self._count_retry(st, verdict.retry_reason, attempt, verdict.wait, url,
                              retry_after=verdict.retry_after)
            await asyncio.sleep(verdict.wait)
            last = r
            attempt += 1

    async def _judge(self, st: HostState, r: StreamedResponse, attempt: int, attempts: int,
                     idempotent: bool, probe: bool, deadline: float) -> Verdict:
        """Read what the decision needs (a small error body) and :func:`decide`."""
        headers = r.headers
        reset_in = rate_limit_reset_in(headers) if r.status in RATE_LIMIT_STATUSES else None
        retry_after = headers.get("Retry-After")
        buffered = True
        if needs_body(r.status, retry_after is not None, reset_in):
            # the error body is small: read it (hints, retries), and it can be kept
            buffered = await r.buffer_small(ERROR_BODY_LIMIT, deadline)
        loop = asyncio.get_running_loop()
        facts = Facts(status=r.status, retry_after=retry_after, body=r.prefix,
                      reset_in=reset_in, attempt=attempt, attempts=attempts, buffered=buffered,
                      idempotent=idempotent, probe=probe, time_left=deadline - loop.time(),
                      backoff=self.backoff(attempt), now=time.time())
        return decide(facts, self.settings.retry, self.settings.circuit)

    async def _carry_out(self, st: HostState, r: StreamedResponse, v: Verdict, probe: bool,
                         kind: str) -> None:
        """What the verdict means for the host: circuit, rate (AIMD), metrics, log."""
        status = r.status
        observed = v.wait if v.action == Action.RATE_LIMITED else v.retry_after
        if observed is not None:
            self.metrics.upstream_retry_after.labels(host=st.label).observe(observed)
        if v.throttled:
            st.limiter.on_throttled()
        if v.action == Action.ACCEPT:
            st.breaker.success(probe=probe)
        elif v.action == Action.FAIL:
            st.request_failed(status, f"status {status}", probe=probe)
        elif v.action == Action.PUSHBACK:
            window = st.breaker.open_for_retry_after(v.wait, status)
            log.warning("upstream_pushback", host=st.host, status=status, retry_after=v.wait,
                        circuit_open_seconds=window, url=safe_url(r.yurl), kind=kind)
        elif v.action == Action.RATE_LIMITED:
            source = "Retry-After" if v.retry_after is not None else "X-RateLimit-Reset in"
            window = st.breaker.open_for_rate_limit(
                v.wait, status, f"rate limit exhausted (X-RateLimit-Remaining: 0, {source} "
                f"{v.wait:.0f}s)")
            log.warning("upstream_rate_limited", host=st.host, status=status,
                        retry_after=v.retry_after, wait=round(v.wait, 3),
                        circuit_open_seconds=round(window, 3), url=safe_url(r.yurl), kind=kind)

    def backoff(self, attempt: int) -> float:
        r = self.settings.retry
        return random.uniform(0, min(float(r.max_delay), float(r.base_delay) * (2 ** attempt)))

    def _count_retry(self, st: HostState, reason: str, attempt: int, delay: float, url: URL,
                     retry_after: Optional[float] = None, quiet: bool = False) -> None:
        """Count a retry; log it at info for a status the host answered (429, 5xx), at debug
        for an error (the request's final failure is logged once, at info)."""
        st.retries += 1
        self.metrics.upstream_retries.labels(host=st.label, reason=reason).inc()
        (log.debug if quiet else log.info)(
            "upstream_retry", host=st.host, reason=reason, attempt=attempt + 1,
            delay=round(delay, 3), retry_after=retry_after, url=safe_url(url))

    async def _attempt(self, st: HostState, method: str, url: URL, headers: CIMultiDict,
                       body: Optional[UploadBody], deadline: float) -> aiohttp.ClientResponse:
        """One try: limiter slot, then the request; returns the live response (slot held).

        A request with a body (an upload passed through for a client; Trivy never uploads to
        its hosts) takes no slot of the host's limiter: a client trickling its body must not
        hold the fetch slots every scanner depends on. Uploads are bounded by the proxy's
        connection limits instead."""
        assert self.session is not None
        loop = asyncio.get_running_loop()
        host = st.host
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AttemptFailed(Reason.DEADLINE, f"deadline passed before a request to {host} "
                                "could be sent", 504, False, upstream_fault=False)
        if body is None:
            waited = await self._acquire_slot(st, remaining)
            self.metrics.upstream_queue_wait.labels(host=st.label).observe(waited)
        bare = url.host or ""
        use_proxy = (self.proxy and self.resolver.override_for(bare, url.port) is None
                     and not self.settings.parent_proxy.bypasses(bare))
        t0 = loop.time()
        cm = asyncio.timeout_at(deadline)
        try:
            async with cm:
                resp = await self.session.request(
                    method, url, headers=headers, data=body, allow_redirects=False,
                    proxy=self.proxy if use_proxy else None,
                    proxy_headers=self.proxy_headers if use_proxy else None)
        except BaseException as exc:
            if body is None:
                st.limiter.release()
            if isinstance(exc, asyncio.CancelledError) and not cm.expired():
                raise
            failed = classify(exc, host, cm.expired(), deadline - t0)
            if body is not None and not body.finished and failed.reason in (
                    Reason.DEADLINE, Reason.TIMEOUT):
                # the client never finished sending: whose stall it was cannot be told
                failed.upstream_fault = False
            if not failed.upstream_fault:
                log.info("upstream_request_abandoned", host=host, reason=failed.reason,
                         error=failed.message, url=safe_url(url))
                raise failed from None
            st.errors += 1
            st.last_error = failed.message
            st.last_at = time.monotonic()
            self.metrics.upstream_responses.labels(host=st.label, status="error").inc()
            log.debug("upstream_attempt_failed", host=host, reason=failed.reason,
                      error=failed.message, url=safe_url(url))
            raise failed from None
        self.metrics.upstream_latency.labels(host=st.label).observe(loop.time() - t0)
        self.metrics.upstream_responses.labels(host=st.label, status=str(resp.status)).inc()
        st.responses += 1
        st.last_status = resp.status
        st.last_at = time.monotonic()
        return resp

    async def _acquire_slot(self, st: HostState, remaining: float) -> float:
        """A token and a concurrency slot of the host's limiter; the seconds waited."""
        host = st.host
        qt = float(st.limiter.cfg.queue_timeout)
        try:
            if self.fleet_budget is not None:
                await self.fleet_budget(host, min(qt, remaining))
            return await st.limiter.acquire(min(qt, remaining))
        except LimiterFull:
            raise UpstreamError(
                Reason.QUEUE_FULL, host, f"too many requests waiting for {host} "
                f"({st.limiter.cfg.queue_size} queued); try again shortly", status=503,
                retry_after=1.0) from None
        except LimiterTimeout:
            if qt < remaining:
                raise UpstreamError(
                    Reason.QUEUE_TIMEOUT, host, f"waited {qt:.1f}s for a free slot to {host} "
                    f"(rate {st.limiter.rate:.2f}/s, {st.limiter.cfg.max_concurrency} at a time)",
                    status=503, retry_after=1.0) from None
            raise AttemptFailed(Reason.DEADLINE, f"deadline reached while queued for {host}",
                                504, False, upstream_fault=False) from None
