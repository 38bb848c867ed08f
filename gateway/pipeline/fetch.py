"""Single-flight upstream fetches that fill the cache while every waiting client streams.

One :class:`FetchJob` per cache key at a time. It runs as its own task (a client that goes away
does not abort it), obtains the upstream response — revalidating a stale entry, following
redirects, falling over to an equivalent repository — and publishes an :class:`Outcome` as soon
as the response head is known. When the response is storable, the body is written into a
:class:`~gateway.cache.Fill` that all waiting clients follow, and the entry is persisted once the
body is complete and verified. Nothing partial or unverified is ever stored.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Awaitable, Callable, Optional

from multidict import CIMultiDict

from ..cache import (BlobStore, DigestMismatch, Entry, EntryStore, Fill, FillFailed, FillState,
                     StoreFull)
from ..observability.logging import get_logger
from ..observability.metrics import Metrics
from ..resources import (IMMUTABLE, Resource, fold_fields, github_ttl, response_ttl,
                         selected_fields, unshareable, vary_names)
from ..upstream.types import UpstreamError, UpstreamRequest, UpstreamResponse
from .serve import storable_headers

log = get_logger("gateway.pipeline")

#: uncacheable answers (errors) up to this size are read and shared with every waiter
SHARE_LIMIT = 1024 * 1024
RETRYABLE_ON_FAILOVER = frozenset({401, 403, 404, 408, 429, 500, 502, 503, 504})
#: kinds whose responses follow RFC 9111 (Vary, private, no-store, Set-Cookie) for every client
RFC9111_KINDS = frozenset({"generic", "github"})

Clock = Callable[[], float]


class OutcomeKind(StrEnum):
    #: stream from ``Outcome.fill`` (being stored)
    FILL = "fill"
    #: serve ``Outcome.entry`` (revalidated)
    ENTRY = "entry"
    #: an uncached answer read whole (errors), shareable with every waiter
    BYTES = "bytes"
    #: an uncached large answer only the first taker can stream
    STREAM = "stream"
    #: no response; ``Outcome.error`` says why
    ERROR = "error"


@dataclass
class Outcome:
    """What a fetch produced, as soon as the response head is known (see :class:`OutcomeKind`)."""

    kind: OutcomeKind
    status: int = 0
    headers: CIMultiDict = field(default_factory=CIMultiDict)
    fill: Optional[Fill] = None
    entry: Optional[Entry] = None
    body: bytes = b""
    response: Optional[UpstreamResponse] = None
    error: Optional[UpstreamError] = None
    fwd_status: Optional[int] = None
    #: the upstream host that finally answered (differs after failover)
    served_by: Optional[str] = None
    taken: bool = False
    #: the upstream's response may be handed to other clients than the one whose request was
    #: sent (RFC 9111 kinds: not private/no-store/Set-Cookie/Vary: *)
    shareable: bool = True
    #: the request fields the response varies on, with the sent request's values
    vary: Optional[dict[str, Optional[str]]] = None


Fetcher = Callable[[UpstreamRequest], Awaitable[UpstreamResponse]]


class FetchJob:
    def __init__(self, key: str, res: Resource, url: str, headers: CIMultiDict,
                 stale: Optional[Entry], blobs: BlobStore, entries: EntryStore,
                 request: Fetcher, equivalents: list[tuple[str, str]], metrics: Metrics,
                 record_failover: Callable[[str, str], None], host: str,
                 on_stored: Optional[Callable[[Entry], None]] = None,
                 deadline: Optional[float] = None, clock: Clock = time.time) -> None:
        self.key = key
        self.res = res
        self.url = url
        self.headers = headers
        self.stale = stale
        self.blobs = blobs
        self.entries = entries
        self.request = request
        self.equivalents = equivalents
        self.metrics = metrics
        self.record_failover = record_failover
        self.host = host
        self.on_stored = on_stored
        #: one deadline (loop time) for the whole job, failover attempts included, so a client
        #: is answered within upstream.retry.deadline even when every source stalls
        self.deadline = deadline
        #: wall clock for freshness (injected: tests move it instead of sleeping)
        self.clock = clock
        self._shareable = True
        self._vary: Optional[dict[str, Optional[str]]] = None
        self.outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.done = asyncio.Event()
        self.waiters = 0
        self.task: Optional[asyncio.Task] = None

    # -------------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            self._publish(Outcome(OutcomeKind.ERROR, error=UpstreamError(
                "cancelled", self.host, "the gateway is shutting down", status=503)))
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer, never a hang
            log.exception("fetch_failed", key=self.key)
            self._publish(Outcome(OutcomeKind.ERROR, error=UpstreamError(
                "protocol", self.host, f"internal error while fetching: {exc}", status=502)))
        finally:
            self.done.set()

    def _publish(self, outcome: Outcome) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)

    def _note_sharing(self, resp: UpstreamResponse) -> None:
        """Record, for the clients coalesced on this job, whether the response may be handed to
        them (RFC 9111 kinds only: OCI and Maven keys already carry what content depends on)."""
        if self.res.kind not in RFC9111_KINDS:
            return
        folded = fold_fields(resp.headers.items())
        self._shareable = not unshareable(folded)
        names = vary_names(folded)
        self._vary = selected_fields(names, fold_fields(self.headers.items())) if names else None

    def _publish_response(self, outcome: Outcome) -> None:
        outcome.shareable, outcome.vary = self._shareable, self._vary
        self._publish(outcome)

    def _build_request(self, url: str, registry_auth: Optional[tuple[str, str]],
                       conditional: bool) -> UpstreamRequest:
        headers = CIMultiDict(self.headers)
        if conditional and self.stale is not None:
            if self.stale.etag:
                headers["If-None-Match"] = self.stale.etag
            elif self.stale.last_modified:
                headers["If-Modified-Since"] = self.stale.last_modified
        if registry_auth:
            headers.popall("Authorization", None)
        return UpstreamRequest("GET", url, headers, follow_redirects=self.res.follow_redirects,
                               resumable=self.res.kind == "oci_blob", registry_auth=registry_auth,
                               kind=self.res.kind, deadline=self.deadline)

    def request_for_remainder(self, offset: int) -> UpstreamRequest:
        """The same fetch, for the bytes from ``offset`` on (used when the disk fails)."""
        req = self._build_request(self.url, self._primary_auth(), conditional=False)
        req.headers["Range"] = f"bytes={offset}-"
        req.resumable = False
        req.deadline = None  # a new fetch, with its own deadline
        return req

    async def _attempt(self, url: str, registry_auth, conditional: bool):
        try:
            return await self.request(self._build_request(url, registry_auth, conditional)), None
        except UpstreamError as exc:
            return None, exc

    def _primary_auth(self) -> Optional[tuple[str, str]]:
        res = self.res
        if res.kind in ("oci_blob", "oci_manifest") and res.public and res.registry:
            return (res.registry, res.repository or "")
        return None

    def _usable(self, resp: Optional[UpstreamResponse]) -> bool:
        if resp is None:
            return False
        if resp.status == 304 and self.stale is not None:
            return True
        if resp.status in self.res.cacheable_statuses:
            return True
        return resp.status == 404 and self.res.negative_ttl is not None

    async def _run(self) -> None:
        res = self.res
        resp, err = await self._attempt(self.url, self._primary_auth(), conditional=True)
        served_by = self.host
        if not self._usable(resp) and self.equivalents and (
                err is not None or resp.status in RETRYABLE_ON_FAILOVER):
            for registry, repository in self.equivalents:
                url = self._equivalent_url(registry, repository)
                alt, alt_err = await self._attempt(url, (registry, repository), conditional=False)
                if alt is not None and alt.status in res.cacheable_statuses:
                    log.warning("failover", key=self.key, from_host=self.host, to_host=registry,
                                reason=err.reason if err else resp.status)
                    self.record_failover(self.host, registry)
                    if resp is not None:
                        await resp.release()
                    resp, err, served_by = alt, None, registry
                    break
                if alt is not None:
                    await alt.release()
        if resp is None:
            self._publish(Outcome(OutcomeKind.ERROR, error=err))
            return
        self._note_sharing(resp)
        if resp.status == 304 and self.stale is not None:
            await resp.release()
            entry = await self._revalidated(resp)
            self._publish(Outcome(OutcomeKind.ENTRY, entry=entry, fwd_status=304,
                                  served_by=served_by, vary=entry.vary))
            return
        if self._usable(resp):
            await self._store(resp, served_by)
            return
        # Not storable: share small answers (errors) with every waiter, stream large ones once.
        length = resp.headers.get("Content-Length")
        headers = CIMultiDict(storable_headers(resp.headers))
        if length is not None and length.isdigit() and int(length) <= SHARE_LIMIT or (
                length is None and resp.status >= 400):
            try:
                body = await resp.read(SHARE_LIMIT)
            except UpstreamError as exc:
                self._publish(Outcome(OutcomeKind.ERROR, error=exc))
                return
            finally:
                await resp.release()
            self._publish_response(Outcome(OutcomeKind.BYTES, resp.status, headers, body=body,
                                           fwd_status=resp.status, served_by=served_by))
        else:
            self._publish_response(Outcome(OutcomeKind.STREAM, resp.status, headers,
                                           response=resp, fwd_status=resp.status,
                                           served_by=served_by))

    def _equivalent_url(self, registry: str, repository: str) -> str:
        res = self.res
        what = "blobs" if res.kind == "oci_blob" else "manifests"
        return f"https://{registry}/v2/{repository}/{what}/{res.reference}"

    # -------------------------------------------------------------------------------------
    def _ttl_for(self, resp: UpstreamResponse) -> Optional[float]:
        res = self.res
        if resp.status == 404 and res.negative_ttl is not None:
            return res.negative_ttl
        if res.kind == "generic":
            return response_ttl(resp.status, fold_fields(resp.headers.items()),
                                "Authorization" in self.headers, now=self.clock())
        if res.kind == "github":
            return github_ttl(fold_fields(resp.headers.items()), res.ttl)
        return res.ttl

    async def _store(self, resp: UpstreamResponse, served_by: str) -> None:
        res = self.res
        ttl = self._ttl_for(resp)
        headers = CIMultiDict(storable_headers(resp.headers))
        expected_digest = res.digest
        if res.kind == "oci_manifest" and expected_digest is None:
            dcd = resp.headers.get("Docker-Content-Digest", "")
            expected_digest = dcd if dcd.startswith("sha256:") and len(dcd) == 71 else None
        if res.kind == "oci_blob":
            headers = CIMultiDict({
                "Content-Type": resp.headers.get("Content-Type", "application/octet-stream"),
                "Docker-Content-Digest": res.digest or "",
                "ETag": f'"{res.digest}"',
            })
        length = resp.headers.get("Content-Length")
        encoded = "Content-Encoding" in resp.headers
        expected_size = int(length) if length and length.isdigit() and not encoded else None
        fill: Optional[Fill] = None
        if ttl is not None:
            try:
                fill = self.blobs.begin_fill(expected_digest, expected_size)
            except StoreFull as exc:
                log.warning("cache_bypass_store_full", key=self.key, reason=str(exc))
        if fill is None:
            # Cannot store (not cacheable after all, or no room): stream it once, uncached.
            self._publish_response(Outcome(OutcomeKind.STREAM, resp.status, headers,
                                           response=resp, fwd_status=resp.status,
                                           served_by=served_by))
            return
        self.metrics.cache_fills_in_flight.inc()
        self._publish_response(Outcome(OutcomeKind.FILL, resp.status, headers, fill=fill,
                                       fwd_status=resp.status, served_by=served_by))
        try:
            try:
                async for chunk in resp.iter_chunks():
                    if not fill.write(chunk):
                        await fill.relay(chunk)   # too large to store: passed through
                if fill.state == FillState.RELAYING:
                    fill.finish_relay()
                    return
                digest = fill.commit()
            except DigestMismatch as exc:
                self.metrics.cache_digest_mismatches.labels(self.metrics.host_label(served_by)).inc()
                log.error("digest_mismatch", key=self.key, host=served_by, error=str(exc))
                return
            except (UpstreamError, StoreFull, FillFailed) as exc:
                fill.fail(exc)
                log.warning("fill_failed", key=self.key, host=served_by, error=str(exc))
                return
            except BaseException as exc:
                fill.fail(exc)
                raise
        finally:
            self.metrics.cache_fills_in_flight.dec()
            await resp.release()
        now = self.clock()
        entry = Entry(
            key=self.key, kind=res.kind, status=resp.status, headers=list(headers.items()),
            body_digest=digest if fill.written else None, body_size=fill.written,
            validated_at=now, fresh_until=now + ttl if ttl != IMMUTABLE else IMMUTABLE,
            etag=resp.headers.get("ETag") if res.kind != "oci_blob" else f'"{res.digest}"',
            last_modified=resp.headers.get("Last-Modified"), negative=resp.status == 404,
            meta=self._meta(resp, digest, served_by), stored_at=now, vary=self._vary)
        if res.kind == "oci_manifest" and entry.etag is None:
            entry.etag = f'"{digest}"'
        small = self.blobs.read_small(digest, self.entries.small_limit) if fill.written else b""
        try:
            await self.entries.put(entry, small)
        except OSError as exc:
            self.metrics.cache_store_errors.labels("io_error").inc()
            log.error("entry_write_failed", key=self.key, error=str(exc))
            return
        if self.on_stored:
            self.on_stored(entry)

    async def _revalidated(self, resp: UpstreamResponse) -> Entry:
        entry = self.stale
        assert entry is not None
        now = self.clock()
        ttl = self._ttl_for(resp) or 0.0
        entry.validated_at = now
        entry.fresh_until = now + ttl if ttl != IMMUTABLE else IMMUTABLE
        refreshed = {k.lower(): v for k, v in storable_headers(resp.headers)}
        if refreshed:
            entry.headers = [(k, refreshed.pop(k.lower(), v)) for k, v in entry.headers]
        await self.entries.put(entry)
        return entry

    def _meta(self, resp: UpstreamResponse, digest: str, served_by: str) -> dict:
        res = self.res
        meta: dict = {"host": served_by}
        if res.registry:
            sep = "@" if (res.reference or "").startswith("sha256:") else ":"
            meta["reference"] = f"{res.registry}/{res.repository}{sep}{res.reference}"
        if res.artifact:
            meta["artifact"] = res.artifact
        if res.kind == "oci_manifest":
            meta["manifest_digest"] = digest
            try:
                doc = json.loads(self.blobs.read_small(digest, 4 * 1024 * 1024) or b"{}")
                layers = doc.get("layers") or []
                if layers:
                    meta["layer_digest"] = layers[0].get("digest")
                    meta["layer_size"] = layers[0].get("size")
            except (ValueError, AttributeError):
                pass
        return meta
