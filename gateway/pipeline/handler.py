"""The request pipeline: policy has allowed the request; now cache, then upstream.

For every :class:`~gateway.exchange.Exchange` the proxy hands over:

1. :func:`gateway.resources.classify` says what it is (blob, tag manifest, POM, …).
2. Not cacheable → forwarded as a stream (``Cache-Status: …; fwd=bypass``).
3. A fresh entry → answered from the cache (memory for small bodies, the blob file otherwise);
   tag manifests close to expiry are refreshed in the background.
4. Otherwise one :class:`~gateway.pipeline.fetch.FetchJob` per key fetches (or revalidates) and
   every concurrent client streams from its fill. If the upstream fails — error, timeout, 429,
   5xx, open circuit — a stale entry within ``max_stale`` is served and marked ``stale``.
"""
from __future__ import annotations

import asyncio
import time
from types import MappingProxyType
from typing import AsyncIterator, Mapping, Optional

from multidict import CIMultiDict

from ..cache import (BlobStore, Entry, EntryStore, Fill, FillFailed, FillReader, PassThroughGap,
                     StoreFull)
from ..exchange import (BytesBody, EmptyBody, Exchange, Origin, Response, StreamBody,
                        error_response)
from ..observability.logging import get_logger
from ..observability.metrics import CacheResult, Metrics
from ..resources import IMMUTABLE, Resource, classify, fold_fields, variant_matches
from ..settings import Settings
from ..upstream.types import UpstreamError, UpstreamRequest
from .fetch import RFC9111_KINDS, Clock, FetchJob, Outcome, OutcomeKind
from .offline import offline_auth_response, public_token_response
from .serve import (HeadBody, cache_status, hit_status, response_from_entry, response_from_fill,
                    storable_headers)

log = get_logger("gateway.pipeline")

#: request fields the gateway handles itself and never forwards on a cacheable fetch
_OWN_FIELDS = ("host", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since",
               "range", "if-range", "accept-encoding", "cache-control", "pragma")
_STALE_ON_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: distinct requests whose classification :meth:`Pipeline._classify` remembers (then it forgets
#: them all at once): a scan repeats a few hundred to a couple of thousand requests (POMs,
#: manifests, tokens), a flood of unique requests only refills it; ~2.3 KB each (measured with
#: tracemalloc: the key holds the request's fields), so at most ~5 MB
CLASSIFIED_MAX = 2048
#: the results of a hit (module constants: an enum member is a slow class attribute lookup)
_HIT, _NEGATIVE, _STALE = CacheResult.HIT, CacheResult.NEGATIVE, CacheResult.STALE
_CLIENT = Origin.CLIENT
#: (host, kind, result) metric children :meth:`Pipeline._count` keeps (then forgets them all)
COUNTERS_MAX = 4096


#: request fields that make an answer from an entry more than the whole stored response
_CONDITIONAL_FIELDS = ("if-none-match", "if-modified-since", "range")


class Classified:
    """What the pipeline makes of a request from its inputs alone — method, URL, header fields
    and the cache settings — remembered per distinct request (:meth:`Pipeline._classify`).
    Every value is a pure function of those inputs; the steps that read them (:meth:`try_hit`,
    :meth:`handle`) are the same for a remembered request and a new one."""

    __slots__ = ("lower", "res", "token", "lookup", "blob_head", "whole")

    def __init__(self, method: str, lower: Mapping[str, str], res: Resource) -> None:
        #: the request's fields folded (lower-case names), a read-only view
        self.lower = lower
        self.res = res
        #: an anonymous registry token the gateway may answer itself (:meth:`Pipeline._token`)
        self.token = bool(res.kind == "oci_auth" and res.cache_key
                          and res.cache_key.startswith("oci-token|"))
        #: answered from the cache at all (else forwarded as a stream)
        self.lookup = res.cache_key is not None and method in ("GET", "HEAD")
        #: a blob's HEAD: from the cache only when the blob is on disk
        self.blob_head = res.kind == "oci_blob" and method == "HEAD"
        #: no conditional or range field: an entry's answer is its whole stored response
        self.whole = not any(name in lower for name in _CONDITIONAL_FIELDS)


class Pipeline:
    """Implements :class:`gateway.exchange.Handler`."""

    def __init__(self, settings: Settings, blobs: BlobStore, entries: EntryStore, upstream,
                 metrics: Metrics, clock: Clock = time.time, fleet=None) -> None:
        self.settings = settings
        #: replicas acting as one cache (gateway/shared/fleet.py): chooses each job's source
        #: (S3, the upstream under the fleet lease, or the leading replica); None: this process
        #: alone, jobs fetch from the upstream as they always did
        self.fleet = fleet
        self.cfg = settings.cache
        self.blobs = blobs
        self.entries = entries
        self.upstream = upstream
        self.metrics = metrics
        self.chunk_size = settings.proxy.chunk_size
        #: wall clock for every freshness decision (injected: tests move it instead of sleeping)
        self.clock = clock
        self._jobs: dict[str, FetchJob] = {}
        self._background: set[asyncio.Task] = set()
        #: artifact name → facts about the last tag manifest served (status page)
        self.artifacts: dict[str, dict] = {}
        #: cache result → count, of client requests (the status page's hit ratio) and of the
        #: prefetcher's requests (kept apart: an idle fleet's prefetch misses are no client's)
        self.results: dict[str, int] = {}
        self.prefetch_results: dict[str, int] = {}
        #: (host, port, scheme, kind, result, client?) → its cache_requests (or
        #: prefetch_cache_requests) child: ``labels()``
        #: validates and joins its arguments on every call, and the host's label is looked up
        #: once; valid for ``metrics.host_labels_generation`` in ``_counters_generation``
        self._request_counters: dict[tuple, object] = {}
        self._counters_generation = -1
        #: request (method, scheme, host, port, target, header fields), or a front door's
        #: shape token → its :class:`Classified`, valid for the ``cache`` settings object in
        #: ``_classified_cfg`` only
        self._classified: dict[object, Classified] = {}
        self._classified_cfg: Optional[object] = None

    # -- entry point ----------------------------------------------------------------------------
    def try_hit(self, ex: Exchange) -> Optional[Response]:
        """The answer to ``ex`` when it is known without awaiting, else None (then
        :meth:`handle`, which would give the same answer for it).

        Why: a small fresh hit held in memory is most of what Trivy asks for, and answering it
        needs no I/O; the proxy calls this first and so spares such a hit the chain of
        coroutines (``handle`` → ``EntryStore.get`` → the front's ``get``). The answer is
        produced by the same lines as in :meth:`handle` (:meth:`_classify`, :meth:`_token`,
        :meth:`_fresh_hit`); None also means "not known here" (a miss, an entry only on disk or
        in Redis, a purge-marker check due), never a different answer.
        """
        known = self._classify(ex)
        res = known.res
        if known.token:
            token = self._token(ex, res)
            if token is not None:
                return token
        if not self._lookup_allowed(ex, known):
            return None
        found = self.entries.peek(res.cache_key)  # type: ignore[arg-type]
        if found is None or (found[0].vary and self._variant(found, known.lower) is None):
            return None
        return self._fresh_hit(ex, res, found, self.clock(), known.whole)

    async def handle(self, ex: Exchange, revalidate: bool = False) -> Response:
        """Answer one request. ``revalidate=True`` (the prefetcher: has the tag moved?) checks
        even a fresh entry with the upstream (conditionally: a 304 keeps it); everything else —
        single flight, circuit, rate limits, verification, stale on failure — as for a client."""
        known = self._classify(ex)
        lower, res = known.lower, known.res
        if known.token:
            token = self._token(ex, res)
            if token is not None:
                return token
        if not self._lookup_allowed(ex, known):
            return await self._forward(ex, res)
        # peek: the same answer as get() when it has one, without two coroutines (a memory hit)
        found = self._variant(self.entries.peek(res.cache_key)
                              or await self.entries.get(res.cache_key), lower)
        now = self.clock()
        if found is not None:
            entry, body = found
            if not revalidate:
                hit = self._fresh_hit(ex, res, found, now, known.whole)
                if hit is not None:
                    return hit
        else:
            entry, body = None, None
        job, leader = self._job_for(ex, res, entry)
        outcome = await asyncio.shield(job.outcome)
        if not leader and not _reusable_for(res, outcome, lower):
            # RFC 9111: what the leader's request got is not this client's (private, Set-Cookie,
            # another Vary variant): fetch its own
            return await self._forward(ex, res)
        return await self._answer(ex, res, outcome, entry, body, collapsed=not leader, job=job)

    # -- the steps shared by try_hit and handle -------------------------------------------------
    def _classify(self, ex: Exchange) -> Classified:
        """What the request's inputs alone decide (:class:`Classified`): its fields folded,
        its Resource, and the flags the steps below read.

        Memoised: :func:`classify` is a pure function of the request line, its header fields
        and ``self.cfg`` (frozen settings), and a scan repeats the same requests (a POM per
        dependency, the same manifests and tokens). The key is all of the request's inputs,
        every header field included as sent (a request differing in ``Accept`` or
        ``Authorization`` is its own key); the memo is dropped whenever ``self.cfg`` is another
        object (a reload assigns a new one). What it holds is never changed (Resource is frozen,
        the fields a read-only view, the flags set once), so sharing it between requests is
        safe.
        """
        cfg = self.cfg
        memo = self._classified
        if cfg is not self._classified_cfg:
            memo.clear()
            self._classified_cfg = cfg
        # a front door's shape token stands for all of those inputs (Exchange.shape)
        key = ex.shape
        if key is None:
            key = (ex.method, ex.scheme, ex.host, ex.port, ex.target, tuple(ex.headers.items()))
        known = memo.get(key)
        if known is None:
            lower = MappingProxyType(fold_fields(tuple(ex.headers.items())))
            # host[:port]: a registry on a non-default port is its own registry
            # (cache.oci.registries); the upstream URL's scheme (ex.url), not necessarily the
            # client connection's
            res = classify(ex.method, ex.authority, ex.path, ex.query, lower, cfg,
                           scheme=ex.scheme)
            if len(memo) >= CLASSIFIED_MAX:
                memo.clear()
            known = memo[key] = Classified(ex.method, lower, res)
        ex.notes["kind"] = known.res.kind
        return known

    def _token(self, ex: Exchange, res: Resource) -> Optional[Response]:
        """An anonymous registry token the gateway answers itself (offline-capable), for a
        request whose :attr:`Classified.token` is set."""
        token = public_token_response(ex, self.cfg)
        if token is not None:
            self._count(ex, res, CacheResult.HIT)
        return token

    def _lookup_allowed(self, ex: Exchange, known: Classified) -> bool:
        """False: not answered from the cache at all (forwarded as a stream)."""
        return known.lookup and not (known.blob_head
                                     and not self.blobs.has(known.res.digest or ""))

    @staticmethod
    def _variant(found: Optional[tuple[Entry, Optional[bytes]]],
                 lower: Mapping[str, str]) -> Optional[tuple[Entry, Optional[bytes]]]:
        if found is not None and found[0].vary and not variant_matches(found[0].vary,
                                                                       _sent_fields(lower)):
            # another variant (RFC 9111 §4.1): neither served, nor revalidated, nor served stale
            return None
        return found

    def _fresh_hit(self, ex: Exchange, res: Resource, found: tuple[Entry, Optional[bytes]],
                   now: float, whole: Optional[bool] = None) -> Optional[Response]:
        """The answer from a fresh entry, or None when it is not fresh (``whole``:
        :attr:`Classified.whole`)."""
        entry, body = found
        if not now < entry.fresh_until:          # Entry.is_fresh(now)
            return None
        result = _NEGATIVE if entry.negative else _HIT
        if res.refresh_ahead:
            self._maybe_refresh(ex, res, entry, now)
        return self._serve(ex, res, entry, body, result,
                           hit_status(result, entry.fresh_until - now), now, whole)

    # -- the cache's answers -------------------------------------------------------------------
    def _serve(self, ex: Exchange, res: Resource, entry: Entry, body: Optional[bytes],
               result: CacheResult, status_value: str, now: Optional[float] = None,
               whole: Optional[bool] = None) -> Response:
        """``now``: the clock's reading when nothing was awaited since (else read here);
        ``whole``: :attr:`Classified.whole` when known."""
        self._count(ex, res, result)
        if entry.meta:
            self._note_artifact(res, entry, stale=result == _STALE)
        try:
            return response_from_entry(ex, entry, body, self.blobs, status_value, self.chunk_size,
                                       now=self.clock() if now is None else now, whole=whole)
        except LookupError:
            # the blob went away between lookup and pin: answer as a miss next time
            asyncio.get_running_loop().create_task(self.entries.delete(entry.key))
            return error_response(503, "cached object vanished; retry", headers={"Retry-After": "1"})

    async def _answer(self, ex: Exchange, res: Resource, outcome: Outcome, stale: Optional[Entry],
                      stale_body: Optional[bytes], collapsed: bool,
                      job: Optional[FetchJob] = None) -> Response:
        now = self.clock()
        if outcome.kind == OutcomeKind.FILL:
            self._count(ex, res, CacheResult.COALESCED if collapsed else CacheResult.MISS)
            ex.notes["upstream_status"] = outcome.fwd_status
            value = cache_status(CacheResult.MISS, fwd_status=outcome.fwd_status, stored=True,
                                 collapsed=collapsed)
            # the reader follows the fill from now on (a pass-through waits for it), closed by
            # the body even if the proxy never starts sending it
            reader = outcome.fill.follow() if ex.method != "HEAD" and job else None
            chunks = self._follow_or_finish_upstream(job, outcome.fill, reader) if reader else None
            return response_from_fill(ex, outcome.status, outcome.headers, outcome.fill, value,
                                      chunks, on_close=reader.aclose if reader else None)
        if outcome.kind == OutcomeKind.ENTRY:
            entry = outcome.entry
            body = stale_body if stale is entry else None
            return self._serve(ex, res, entry, body, CacheResult.REVALIDATED,
                               cache_status(CacheResult.REVALIDATED, fwd_status=304,
                                            ttl=entry.ttl_left(now), collapsed=collapsed))
        # The upstream gave no storable answer: serve stale if allowed.
        failed_status = (outcome.status if outcome.kind in (OutcomeKind.BYTES, OutcomeKind.STREAM)
                         else None)
        upstream_failed = (outcome.kind == OutcomeKind.ERROR
                           or failed_status in _STALE_ON_STATUS) or (
            # GitHub's rate limits: 403 with X-RateLimit-Remaining: 0 (primary) or with
            # Retry-After (secondary; 429s are covered above)
            failed_status == 403 and (outcome.headers.get("X-RateLimit-Remaining") == "0"
                                      or "Retry-After" in outcome.headers))
        if stale is not None and upstream_failed and stale.staleness(now) <= res.max_stale:
            if (outcome.kind == OutcomeKind.STREAM and outcome.response is not None
                    and not outcome.taken):
                outcome.taken = True
                await outcome.response.release()
            why = outcome.error.reason if outcome.error else f"upstream {failed_status}"
            log.warning("serving_stale", key=res.cache_key, host=ex.host, why=why,
                        stale_for=round(stale.staleness(now)))
            return self._serve(ex, res, stale, stale_body, CacheResult.STALE,
                               cache_status(CacheResult.STALE, ttl=stale.ttl_left(now),
                                            detail="stale",
                                            fwd_status=failed_status))
        if upstream_failed and res.kind == "oci_auth":
            offline = offline_auth_response(ex, res, self.cfg)
            if offline is not None:
                self._count(ex, res, CacheResult.ERROR)
                return offline
        if outcome.kind == OutcomeKind.ERROR:
            self._count(ex, res, CacheResult.ERROR)
            err = outcome.error
            headers = {"Cache-Status": cache_status(CacheResult.MISS, detail=err.reason)}
            if err.retry_after:
                headers["Retry-After"] = str(max(1, int(round(err.retry_after))))
            ex.notes["upstream_error"] = err.reason
            return error_response(err.status, f"trivy-gateway: {err.message}",
                                  reason=_reason_phrase(err), headers=headers)
        self._count(ex, res, CacheResult.COALESCED if collapsed else CacheResult.MISS)
        headers = CIMultiDict(outcome.headers)
        headers["Cache-Status"] = cache_status(CacheResult.MISS, fwd_status=outcome.status,
                                               collapsed=collapsed)
        ex.notes["upstream_status"] = outcome.status
        if outcome.kind == OutcomeKind.BYTES:
            body = BytesBody(outcome.body) if ex.method != "HEAD" else BytesBody(b"")
            return Response(outcome.status, headers, body, source="upstream")
        if not outcome.taken and outcome.response is not None:
            outcome.taken = True
            resp = outcome.response
            return Response(resp.status, headers, _upstream_body(resp, ex.method),
                            source="upstream")
        return await self._forward(ex, res)  # the single stream was taken: fetch our own

    async def _follow_or_finish_upstream(self, job: FetchJob, fill: Fill,
                                         reader: FillReader) -> AsyncIterator[bytes]:
        """Stream a fill; if the *disk* fails mid-way, fetch the rest from the upstream.

        A full disk must not fail a client while the upstream is healthy: each follower asks
        for the remaining bytes with ``Range`` (nothing is stored; clients verify digests). The
        same for a follower that fell behind a pass-through (a body too large to store).
        """
        pos = 0
        try:
            async for chunk in reader:
                pos += len(chunk)
                yield chunk
            return
        except FillFailed as exc:
            if not isinstance(fill.error, StoreFull) and not isinstance(exc, PassThroughGap):
                raise
        log.warning("cache_store_failed_finishing_from_upstream", key=job.key, offset=pos)
        req = job.request_for_remainder(pos)
        resp = await self.upstream.request(req)
        try:
            if resp.status != 206 or not resp.headers.get("Content-Range", "").startswith(
                    f"bytes {pos}-"):
                raise FillFailed(f"cannot finish from upstream after a disk failure "
                                 f"(status {resp.status})")
            async for chunk in resp.iter_chunks():
                yield chunk
        finally:
            await resp.release()

    # -- single flight ---------------------------------------------------------------------
    def _job_for(self, ex: Exchange, res: Resource, stale: Optional[Entry]) -> tuple[FetchJob, bool]:
        job = self._jobs.get(res.cache_key)
        if job is not None and not job.done.is_set():
            job.waiters += 1
            return job, False
        job = self._start_job(ex, res, stale)
        job.waiters += 1
        return job, True

    def _start_job(self, ex: Exchange, res: Resource, stale: Optional[Entry]) -> FetchJob:
        headers = CIMultiDict((k, v) for k, v in ex.headers.items()
                              if k.lower() not in _OWN_FIELDS)
        equivalents = []
        if res.kind in ("oci_blob", "oci_manifest") and res.public and res.registry:
            equivalents = [eq for eq in self.upstream.equivalents(res.registry, res.repository)
                           if f"{eq[0]}/{eq[1]}" in self.cfg.oci.public_repositories]
        request = self.upstream.request
        source = None
        if self.fleet is not None and res.kind != "oci_auth":
            request = source = self.fleet.fetcher(res.cache_key, res, self.upstream.request)
        job = FetchJob(res.cache_key, res, ex.url, headers, stale, self.blobs,
                       self.entries, request, equivalents, self.metrics,
                       self.upstream.record_failover, ex.authority,
                       on_stored=lambda entry: self._note_artifact(res, entry, stale=False),
                       deadline=asyncio.get_running_loop().time()
                       + self.settings.upstream.retry.deadline, clock=self.clock)
        self._jobs[res.cache_key] = job
        if source is not None:
            self.fleet.attach(job, source)
        task = asyncio.get_running_loop().create_task(job.run(), name=f"fetch {res.cache_key}")
        job.task = task
        self._background.add(task)

        def _done(t: asyncio.Task, key=res.cache_key, job=job) -> None:
            self._background.discard(t)
            if self._jobs.get(key) is job:
                del self._jobs[key]
            if source is not None:
                self.fleet.detach(job, source)
        task.add_done_callback(_done)
        return job

    def _maybe_refresh(self, ex: Exchange, res: Resource, entry: Entry, now: float) -> None:
        """Refresh a tag manifest in the background before it expires (clients rarely wait)."""
        if not res.refresh_ahead or not res.public or entry.fresh_until == IMMUTABLE:
            return
        ttl = res.ttl
        if now - entry.validated_at < ttl * res.refresh_ahead or res.cache_key in self._jobs:
            return
        log.info("refresh_ahead", key=res.cache_key)
        self._start_job(ex, res, entry)

    # -- pass-through -------------------------------------------------------------------------
    async def _forward(self, ex: Exchange, res: Resource) -> Response:
        headers = CIMultiDict((k, v) for k, v in ex.headers.items() if k.lower() != "host")
        registry_auth = None
        if res.kind in ("oci_blob", "oci_manifest") and res.public and res.registry:
            # public content is always fetched with the gateway's own token (the client may
            # hold the gateway's placeholder token, which the registry does not know)
            registry_auth = (res.registry, res.repository or "")
            headers.popall("Authorization", None)
        req = UpstreamRequest(ex.method, ex.url, headers, body=ex.body, kind=res.kind,
                              registry_auth=registry_auth)
        self._count(ex, res, CacheResult.BYPASS)
        try:
            resp = await self.upstream.request(req)
        except UpstreamError as err:
            ex.notes["upstream_error"] = err.reason
            extra = {"Cache-Status": cache_status(CacheResult.BYPASS, detail=err.reason)}
            if err.retry_after:
                extra["Retry-After"] = str(max(1, int(round(err.retry_after))))
            return error_response(err.status, f"trivy-gateway: {err.message}",
                                  reason=_reason_phrase(err), headers=extra)
        ex.notes["upstream_status"] = resp.status
        out = CIMultiDict(storable_headers(resp.headers))
        out["Cache-Status"] = cache_status(CacheResult.BYPASS, fwd_status=resp.status)
        return Response(resp.status, out, _upstream_body(resp, ex.method), reason=resp.reason,
                        source="upstream")

    # -- helpers ----------------------------------------------------------------------------
    def _count(self, ex: Exchange, res: Resource, result: CacheResult) -> None:
        """Count ``result`` for ``ex``: a client's in ``results`` and
        trivy_gateway_cache_requests_total (the hit ratio), the prefetcher's apart."""
        ex.notes["cache"] = result
        client = ex.origin is _CLIENT
        results = self.results if client else self.prefetch_results
        results[result] = results.get(result, 0) + 1
        counters = self._request_counters
        generation = self.metrics.host_labels_generation
        if generation != self._counters_generation:   # a host got its own label: relabel
            counters.clear()
            self._counters_generation = generation
        key = (ex.host, ex.port, ex.scheme, res.kind, result, client)
        counter = counters.get(key)
        if counter is None:
            if len(counters) >= COUNTERS_MAX:
                counters.clear()
            metric = self.metrics.cache_requests if client else self.metrics.prefetch_cache_requests
            counter = counters[key] = metric.labels(
                self.metrics.host_label(ex.authority), res.kind, result)
        self.metrics.deferred.add(counter)

    def _note_artifact(self, res: Resource, entry: Entry, stale: bool) -> None:
        name = entry.meta.get("artifact") if entry.meta else None
        if not name or not (res.kind == "oci_manifest" and res.reference
                            and not res.reference.startswith("sha256:")
                            or res.kind == "github" and entry.status == 200):
            return
        now = self.clock()
        age = max(0.0, now - entry.validated_at)
        self.metrics.artifact_age.labels(name).set(age)
        self.artifacts[name] = {
            "artifact": name,
            "reference": entry.meta.get("reference") or entry.key.split("|")[1],
            "digest": entry.meta.get("layer_digest") or entry.meta.get("manifest_digest")
            or entry.body_digest,
            "size": entry.meta.get("layer_size") or entry.body_size,
            "fetched_at": entry.validated_at,
            "age_seconds": age,
            "stale": stale or not entry.is_fresh(now),
        }

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _sent_fields(lower: Mapping[str, str]) -> dict[str, str]:
    """The client's request fields as a cacheable fetch sends them upstream (the fields the
    gateway sets itself, e.g. Accept-Encoding, are the same for every client)."""
    return {k: v for k, v in lower.items() if k not in _OWN_FIELDS}


def _reusable_for(res: Resource, outcome: Outcome, lower: Mapping[str, str]) -> bool:
    """May a coalesced client be given the answer to the leader's request?"""
    if res.kind not in RFC9111_KINDS or outcome.kind == OutcomeKind.ERROR:
        return True
    if not outcome.shareable:
        return False
    return not outcome.vary or variant_matches(outcome.vary, _sent_fields(lower))


def _reason_phrase(err: UpstreamError) -> str:
    text = err.message.replace("\r", " ").replace("\n", " ")
    return text[:200]


def _upstream_body(resp, method: str):
    length = resp.headers.get("Content-Length")
    if method == "HEAD":
        body = HeadBody(int(length)) if length and length.isdigit() else EmptyBody()
        asyncio.get_running_loop().create_task(resp.release())
        return body
    return StreamBody(resp.iter_chunks(), int(length) if length and length.isdigit() else None,
                      on_close=resp.release)
