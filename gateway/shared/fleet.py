"""One upstream fetch per object for the whole fleet (docs/scale-out.md).

The pipeline keeps its own single flight per process; this module only chooses the *source* a
fetch job reads its response from, through the job's fetcher (:meth:`Fleet.fetcher`). The job
then fills, verifies and stores exactly as it always does:

1. a store has the verified body (an OCI blob by digest, or an immutable entry whose digest the
   shared front knows) → stream it from S3, else from another replica's local tier (0 upstream
   requests; the digest is checked again while it streams);
2. the fleet lease for the key is free → take it and fetch from the upstream (the leader); the
   lease is renewed while the job runs, kept until the body is in S3, then released;
3. another replica holds it → stream its fill in progress from its peer endpoint (a follower);
4. the leader goes away mid-body → break its lease at once if its peer port refuses
   connections (the process is gone), else wait for the lease to expire; take it and resume
   from the upstream with ``Range`` from the byte reached (or skip that many bytes of a 200: one
   refetch), or follow whichever replica took it over, from that byte.

The follower's own fill verifies the digest before anything is stored, so a leader that died
or sent bad bytes can make a client's download fail (truncated), never complete wrongly.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from typing import AsyncIterator, Awaitable, Callable, Optional

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from ..cache import BlobStore, EntryStore, FillState
from ..observability.logging import get_logger
from ..observability.metrics import FLEET_ROLES, Metrics
from ..upstream.types import UpstreamError, UpstreamRequest, UpstreamResponse
from .s3 import S3Tier
from .state import Holder, SharedState

log = get_logger("gateway.shared")

#: how often a replica waiting for a lease looks again
POLL = 0.2
#: a follower hands over between leaders at most this many times for one body
MAX_HANDOVERS = 5
READ_CHUNK = 256 * 1024


async def _verified(chunks: AsyncIterator[bytes], digest: str) -> AsyncIterator[bytes]:
    """``chunks``, then an error instead of a clean end if they do not hash to ``digest``
    (a body from a store is checked again: the fill then fails, and nothing is kept)."""
    h = hashlib.sha256()
    try:
        async for chunk in chunks:
            h.update(chunk)
            yield chunk
    finally:
        await chunks.aclose()
    if "sha256:" + h.hexdigest() != digest:
        raise UpstreamError("body", "store", f"stored body does not match {digest}")


def key_id(cache_key: str) -> str:
    return hashlib.sha256(cache_key.encode()).hexdigest()


class _JobSource:
    """The fetcher of one job: its first call (the primary request) goes through the fleet;
    later calls (failover to equivalent repositories) go to the upstream directly."""

    def __init__(self, fleet: "Fleet", key: str, res, upstream) -> None:
        self.fleet = fleet
        self.key = key
        self.key_id = key_id(key)
        self.res = res
        self.upstream = upstream
        self.first = True
        self.leading = False
        self.job = None
        self._renewer: Optional[asyncio.Task] = None

    async def __call__(self, req: UpstreamRequest) -> UpstreamResponse:
        if not self.first:
            return await self.upstream(req)
        self.first = False
        return await self.fleet._source(self, req)

    def lead(self, takeover: bool = False) -> None:
        self.leading = True
        self.fleet.count("takeover" if takeover else "led")
        if takeover:
            log.warning("fleet_fill_taken_over", key=self.key)
        self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        interval = self.fleet.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            if not await self.fleet.state.renew_lease(self.key_id):
                log.warning("fleet_lease_lost", key=self.key)

    async def release(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self.leading:
            await self.fleet.state.release_lease(self.key_id)


class _HeadResponse(UpstreamResponse):
    """A response whose head was given and whose body is an async iterator (S3, a peer)."""

    def __init__(self, status: int, headers: CIMultiDict, url: str,
                 body: AsyncIterator[bytes], close: Callable[[], None]) -> None:
        self._close = close
        self.status = status
        self.reason = ""
        self.headers = CIMultiDictProxy(headers)
        self.url = url
        self.history = ()
        self._body = body

    def iter_chunks(self) -> AsyncIterator[bytes]:
        return self._body

    async def read(self, limit: int = 16 * 1024 * 1024) -> bytes:
        out = bytearray()
        async for chunk in self._body:
            out += chunk
            if len(out) > limit:
                raise UpstreamError("body", "peer", f"body larger than {limit} bytes")
        return bytes(out)

    async def release(self) -> None:
        """Close the body (its generator releases what it holds; if it never started, the
        source is closed here: a peer's connection, an S3 stream)."""
        await self._body.aclose()
        self._close()


class Fleet:
    def __init__(self, state: SharedState, s3: Optional[S3Tier], blobs: BlobStore,
                 entries: EntryStore, metrics: Metrics, lease_ttl: float,
                 peer_address: str = "") -> None:
        self.state = state
        #: where other replicas reach this one's peer endpoint ("" = none: nothing is served)
        self.peer_address = peer_address
        self.s3 = s3
        self.blobs = blobs
        self.entries = entries
        self.metrics = metrics
        self.lease_ttl = lease_ttl
        #: key id → the job on this replica (served to peers while it runs and until uploaded)
        self.jobs: dict[str, object] = {}
        self._session: Optional[aiohttp.ClientSession] = None
        self._tasks: set[asyncio.Task] = set()
        #: fills on this replica by source (the status page; the same as the metric)
        self.counts: dict[str, int] = {role: 0 for role in FLEET_ROLES}

    def count(self, role: str) -> None:
        self.counts[role] += 1
        self.metrics.fleet_fills.labels(role=role).inc()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- the pipeline's seam -----------------------------------------------------------------
    def fetcher(self, key: str, res, upstream) -> _JobSource:
        return _JobSource(self, key, res, upstream)

    def attach(self, job, source: _JobSource) -> None:
        source.job = job
        self.jobs[source.key_id] = job

    def detach(self, job, source: _JobSource) -> None:
        """The job ended: upload what it led to S3, then stop serving it and release."""
        task = asyncio.get_running_loop().create_task(self._finish(job, source))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def job_for(self, kid: str):
        return self.jobs.get(kid)

    async def _finish(self, job, source: _JobSource) -> None:
        try:
            outcome = job.outcome.result() if job.outcome.done() else None
            fill = outcome.fill if outcome is not None else None
            if fill is not None and fill.state == FillState.COMMITTED and fill.digest:
                if source.leading and self.s3 is not None:
                    await self._upload(fill.digest, fill.written)
                if self.peer_address:
                    await self.state.add_holder(fill.digest, self.peer_address)
        finally:
            if self.jobs.get(source.key_id) is job:
                del self.jobs[source.key_id]
            await source.release()

    async def _upload(self, digest: str, size: int) -> None:
        path = self.blobs.pin(digest)
        if path is None:
            return
        try:
            await self.s3.upload(digest, path, size)
        finally:
            self.blobs.unpin(digest)

    # -- choosing the source -----------------------------------------------------------------
    async def _source(self, src: _JobSource, req: UpstreamRequest) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 2 * self.lease_ttl + 5
        while loop.time() < give_up:
            stored = await self._from_store(src, req)
            if stored is not None:
                return stored
            holder = await self.state.acquire_lease(src.key_id)
            if holder is None:
                src.lead()
                return await src.upstream(req)
            if holder.replica != self.state.replica_id and holder.peer:
                peer = await self._open_peer(holder, src.key_id, 0)
                if peer is not None:
                    return self._peer_response(src, req, peer)
            await asyncio.sleep(POLL)
        log.warning("fleet_lease_wait_gave_up", key=src.key)
        return await src.upstream(req)

    async def _stored_digest(self, src: _JobSource) -> Optional[tuple[str, int, CIMultiDict]]:
        """(digest, status, headers) of a verified body some store may hold for this key: an
        OCI blob by its digest, or an immutable entry in the shared front."""
        res = src.res
        if res.kind == "oci_blob" and res.digest:
            return res.digest, 200, CIMultiDict()
        found = await self.entries.front.get(src.key)
        entry = found[0] if found else None
        if (entry is None or not entry.body_digest or entry.negative
                or entry.fresh_until != float("inf")):
            return None
        return entry.body_digest, entry.status, CIMultiDict(entry.headers)

    async def _from_store(self, src: _JobSource, req: UpstreamRequest
                          ) -> Optional[UpstreamResponse]:
        """The body from S3, else from another replica's local tier, verified while it
        streams; None when neither has it."""
        if self.s3 is None and not self.peer_address:
            return None
        known = await self._stored_digest(src)
        if known is None:
            return None
        digest, status, headers = known
        headers.popall("Content-Encoding", None)
        if self.s3 is not None:
            obj = await self.s3.open(digest)
            if obj is not None:
                self.count("s3")
                headers["Content-Length"] = str(obj.size)
                body = _verified(self._or_upstream(src, req, "s3", obj.chunks(), obj.size,
                                                   obj.close), digest)
                return _HeadResponse(status, headers, req.url, body, obj.close)
        for peer in await self.state.holders(digest):
            if peer == self.peer_address:
                continue
            resp = await self._get_peer(peer, f"/peer/blob/{digest}")
            if resp is None or resp.content_length is None:
                if resp is not None:
                    resp.release()
                await self.state.drop_holder(digest, peer)
                continue
            self.count("peer")
            headers["Content-Length"] = str(resp.content_length)
            body = _verified(self._or_upstream(
                src, req, f"peer {peer}", resp.content.iter_chunked(READ_CHUNK),
                resp.content_length, resp.release), digest)
            return _HeadResponse(status, headers, req.url, body, resp.release)
        return None

    async def _or_upstream(self, src: _JobSource, req: UpstreamRequest, where: str,
                           chunks: AsyncIterator[bytes], size: int,
                           close: Callable[[], None]) -> AsyncIterator[bytes]:
        """A stored body (``size`` bytes from S3 or a peer's disk); if the store fails part-way,
        the rest comes from the upstream with ``Range`` (a store is never a single point of
        failure for a client already being served)."""
        pos = 0
        try:
            async for chunk in chunks:
                pos += len(chunk)
                yield chunk
            if pos == size:
                return
            why = f"ended at byte {pos} of {size}"
        except Exception as exc:  # noqa: BLE001 - any store failure: finish from the upstream
            why = f"{type(exc).__name__}: {exc}"
        finally:
            close()
        log.warning("store_read_failed_finishing_from_upstream", store=where, key=src.key,
                    offset=pos, error=why)
        async for chunk in self._resume_upstream(src, req, pos):
            yield chunk

    # -- following a peer --------------------------------------------------------------------
    async def _get_peer(self, peer: str, path: str,
                        lease: Optional[tuple[Holder, str]] = None
                        ) -> Optional[aiohttp.ClientResponse]:
        """GET ``path`` from a replica's peer endpoint; None unless it answers 200. A ``lease``
        (holder, key id) whose peer port refuses the connection is gone (kill -9, crash): its lease is
        broken at once instead of waiting for it to expire (a holder that does not answer at
        all still waits for the expiry)."""
        assert self._session is not None
        try:
            resp = await self._session.get(
                f"http://{peer}{path}",
                headers={"Authorization": f"Bearer {self.state.peer_token}"},
                timeout=aiohttp.ClientTimeout(sock_connect=2, sock_read=self.lease_ttl))
        except aiohttp.ClientConnectorError as exc:
            if lease is not None and isinstance(exc.os_error, ConnectionRefusedError):
                holder, kid = lease
                log.warning("fleet_lease_broken", key_id=kid, holder=holder.replica, peer=peer,
                            why="its peer port refuses connections")
                await self.state.break_lease(kid, holder)
            return None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None
        if resp.status != 200:
            resp.release()
            return None
        return resp

    def _open_peer(self, holder: Holder, kid: str, start: int
                   ) -> Awaitable[Optional[aiohttp.ClientResponse]]:
        """The lease holder's fill in progress, from byte ``start``."""
        return self._get_peer(holder.peer, f"/peer/fill/{kid}?from={start}", (holder, kid))

    def _peer_response(self, src: _JobSource, req: UpstreamRequest,
                       peer: aiohttp.ClientResponse) -> UpstreamResponse:
        self.count("followed")
        try:
            headers = CIMultiDict(json.loads(peer.headers.get("X-Peer-Headers", "[]")))
            status = int(peer.headers["X-Peer-Status"])
        except (ValueError, KeyError, TypeError):
            headers, status = CIMultiDict(), 502
        length = peer.headers.get("X-Peer-Length")
        headers.popall("Content-Length", None)
        if length is not None:
            headers["Content-Length"] = length
        expected = int(length) if length and length.isdigit() else None
        return _HeadResponse(status, headers, req.url,
                             self._peer_body(src, req, peer, expected), peer.release)

    async def _peer_body(self, src: _JobSource, req: UpstreamRequest,
                         peer: Optional[aiohttp.ClientResponse],
                         expected: Optional[int]) -> AsyncIterator[bytes]:
        pos = 0
        for _ in range(MAX_HANDOVERS):
            if peer is not None:
                why = ""
                try:
                    async for chunk in peer.content.iter_chunked(READ_CHUNK):
                        pos += len(chunk)
                        yield chunk
                    if expected is None or pos == expected:
                        return
                    why = f"peer body ended at byte {pos} of {expected}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                finally:
                    peer.release()
                log.warning("fleet_leader_lost", key=src.key, offset=pos, error=why)
            peer = await self._lead_or_follow(src, pos)
            if peer is None:
                async for chunk in self._resume_upstream(src, req, pos):
                    yield chunk
                return
        raise UpstreamError("body", "peer", f"gave up after {MAX_HANDOVERS} leader changes")

    async def _lead_or_follow(self, src: _JobSource, pos: int
                              ) -> Optional[aiohttp.ClientResponse]:
        """After the leader's stream broke: take the lease (None: resume from the upstream
        here) or follow whichever replica holds it now, from ``pos``. Bounded by the lease."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 2 * self.lease_ttl + 5
        while loop.time() < give_up:
            holder = await self.state.acquire_lease(src.key_id)
            if holder is None:
                src.lead(takeover=True)
                return None
            if holder.replica != self.state.replica_id and holder.peer:
                peer = await self._open_peer(holder, src.key_id, pos)
                if peer is not None:
                    return peer
            await asyncio.sleep(POLL)
        raise UpstreamError("body", "peer", f"no replica took over within "
                            f"{2 * self.lease_ttl + 5:.0f}s")

    async def _resume_upstream(self, src: _JobSource, req: UpstreamRequest,
                               pos: int) -> AsyncIterator[bytes]:
        """The rest of the body from the upstream: ``Range`` from ``pos``; a 200 instead of a
        206 is read from the start and its first ``pos`` bytes skipped (one refetch)."""
        headers = CIMultiDict((k, v) for k, v in req.headers.items()
                              if k.lower() not in ("if-none-match", "if-modified-since"))
        if pos:
            headers["Range"] = f"bytes={pos}-"
        again = dataclasses.replace(req, headers=headers, resumable=pos == 0, deadline=None)
        resp = await src.upstream(again)
        try:
            skip = 0
            if pos and resp.status == 206 and resp.headers.get(
                    "Content-Range", "").startswith(f"bytes {pos}-"):
                log.info("fleet_resumed", key=src.key, offset=pos)
            elif resp.status == 200:
                skip = pos
                if pos:
                    log.info("fleet_refetched", key=src.key, skipped=pos)
            else:
                raise UpstreamError("body", "upstream", f"cannot finish the body from byte {pos}: "
                                    f"upstream answered {resp.status}")
            async for chunk in resp.iter_chunks():
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                yield chunk
        finally:
            await resp.release()
