"""Content-addressed body store on disk, with fills that readers can follow while they grow.

Layout under the cache root (one filesystem, so publishing is an atomic ``rename``)::

    blobs/sha256/ab/abcdef…   published bodies, named by the sha256 of their bytes
    tmp/fill-…                bodies being written; removed at start-up (never served)

Why every cached body lives here, not only OCI blobs: one mechanism gives all kinds the same
guarantees — hashed while streaming, verified before publish, atomic rename, LRU eviction that
never touches a pinned blob — and identical bodies (the same DB on two registries) are stored once.

A :class:`Fill` is written by exactly one producer (a background task, so a client that goes
away does not abort it) and read by any number of followers through :meth:`Fill.follow`, which
streams the bytes already on disk and then waits for more: followers see the first byte long
before a 650 MiB Java DB has landed. Readers keep their file descriptor open, so the rename at
publish time (or the unlink after a failure) never pulls bytes from under them.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import AsyncIterator, Optional

from ..observability.logging import get_logger
from ..observability.metrics import Metrics

log = get_logger("gateway.cache")

READ_CHUNK = 256 * 1024
#: a fill of unknown length looks at the filesystem's free space after every this many bytes
SPACE_CHECK_BYTES = 8 * 1024 * 1024
#: a pass-through holds at most about this much in memory for its slowest reader
RELAY_WINDOW = 4 * 1024 * 1024
#: a pass-through whose readers read nothing for this long is abandoned (the producer stops)
RELAY_STALL = 120.0


class DigestMismatch(Exception):
    """The bytes received do not hash to the digest that was asked for."""


class FillFailed(Exception):
    """The producer of a fill gave up (upstream error, disk error); followers must abort."""


class StoreFull(Exception):
    """Not enough disk (budget or free space) to store a body; serve it without storing."""


@dataclass
class BlobRecord:
    size: int
    last_access: float
    pins: int = 0


def _hex_of(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"unsupported digest {digest!r}")
    return hexpart


class FillState(StrEnum):
    FILLING = "filling"
    COMMITTED = "committed"
    FAILED = "failed"
    #: past the largest storable size: the rest of the body is handed to readers, not stored
    RELAYING = "relaying"
    RELAYED = "relayed"


class PassThroughGap(FillFailed):
    """A reader of a pass-through fill fell behind what is still held in memory."""


class Fill:
    """One body being written to ``tmp/``; see the module docstring.

    States: ``filling`` → ``committed`` (verified, published) or ``failed``; or, when a body of
    unknown length passes the largest object the cache keeps (``limit``) or the free-space floor,
    ``filling`` → ``relaying`` → ``relayed``: nothing more is written to disk, the producer hands
    the rest of the body to the readers that follow it through a bounded window in memory
    (pass-through, waiting for the slowest reader), and nothing is stored. With no reader left,
    relaying fails and the producer stops fetching.
    """

    def __init__(self, store: "BlobStore", expected_digest: Optional[str],
                 expected_size: Optional[int], limit: int) -> None:
        self.store = store
        self.expected_digest = expected_digest
        self.expected_size = expected_size
        #: bytes this fill may write to disk; past it the body is passed through, not stored
        self.limit = limit
        self._space_checked_at = 0
        self.path = store.tmp_dir / f"fill-{os.getpid()}-{time.monotonic_ns()}-{id(self):x}"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._hash = hashlib.sha256()
        self.written = 0
        self.digest: Optional[str] = None
        self.state = FillState.FILLING
        self.error: Optional[BaseException] = None
        self._wakeup = asyncio.Event()
        self._reserved = expected_size or 0
        store._reserved += self._reserved
        # pass-through (relaying): chunks past the disk part, oldest first, as (offset, bytes)
        self._window: "deque[tuple[int, bytes]]" = deque()
        self._window_bytes = 0
        self._relay_end = 0
        #: reader id → its position; a reader counts from its creation until it is closed
        self._readers: dict[int, int] = {}
        self._reader_ids = itertools.count()
        self._progress = asyncio.Event()

    # -- producer side --------------------------------------------------------------------
    def write(self, data: bytes) -> bool:
        """Append bytes (blocking write: page-cache speed; an ENOSPC surfaces as StoreFull).

        Returns False when the bytes were not written because the fill is (now) passing the
        body through: the producer hands them to :meth:`relay` instead."""
        if self.state == FillState.RELAYING:
            return False
        if self.state != FillState.FILLING:
            raise FillFailed("fill is closed")
        why = self._no_room(len(data))
        if why is not None:
            self._start_relay(why)
            return False
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            reason = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io_error"
            self.store.metrics.cache_store_errors.labels(reason).inc()
            log.error("cache_write_failed", path=str(self.path), error=str(exc), reason=reason)
            self.fail(StoreFull(f"cannot write cache file: {exc.strerror}"))
            raise StoreFull(str(exc)) from None
        self._hash.update(data)
        self.written += len(data)
        self._notify()
        return True

    def _no_room(self, incoming: int) -> Optional[str]:
        """Why the next bytes must not be stored, or None: the body passed the largest object
        the cache keeps, or the filesystem's free space fell under ``min_free_space`` (checked
        every :data:`SPACE_CHECK_BYTES` of a body of unknown length). A chunked response must
        neither fill the disk nor, at publish, evict the whole cache."""
        if self.written + incoming > self.limit:
            return f"body passed {self.limit} bytes, the largest object the cache keeps"
        if self.expected_size is None and \
                self.written + incoming - self._space_checked_at >= SPACE_CHECK_BYTES:
            self._space_checked_at = self.written + incoming
            free = self.store.free_space()
            if free is not None and free - incoming < self.store.min_free_space:
                self.store.metrics.cache_store_errors.labels("disk_full").inc()
                return f"only {free} bytes free on the cache filesystem"
        return None

    def _start_relay(self, why: str) -> None:
        log.warning("cache_fill_passed_through", path=str(self.path), written=self.written,
                    reason=why)
        self.state = FillState.RELAYING
        self._relay_end = self.written
        self._close_fd()
        self._release_reservation()
        self._notify()

    async def relay(self, data: bytes) -> None:
        """Hand ``data`` to the readers (pass-through); waits while the slowest reader is more
        than :data:`RELAY_WINDOW` behind. Raises FillFailed when no reader is left or they
        stopped reading for :data:`RELAY_STALL` seconds: the producer then stops fetching."""
        if self.state != FillState.RELAYING:
            raise FillFailed("fill is not passing through")
        self._window.append((self._relay_end, data))
        self._relay_end += len(data)
        self._window_bytes += len(data)
        self._notify()
        while True:
            low = min(self._readers.values(), default=self._relay_end)
            while self._window and self._window[0][0] + len(self._window[0][1]) <= low:
                self._window_bytes -= len(self._window.popleft()[1])
            if not self._readers:
                raise FillFailed("no client follows the pass-through any more")
            if self._window_bytes <= RELAY_WINDOW:
                return
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), RELAY_STALL)
            except asyncio.TimeoutError:
                raise FillFailed("clients stopped reading the pass-through") from None

    def finish_relay(self) -> None:
        """The upstream body ended: readers finish with what the window holds."""
        if self.state == FillState.RELAYING:
            self.state = FillState.RELAYED
            self._unlink()
            self._notify()

    def seal(self) -> str:
        """Verify size and digest and flush the bytes to disk, without publishing them yet.

        Why separate from :meth:`commit`: a bundle import seals every body of the bundle first
        and publishes only once the whole bundle verified, so a bad bundle stores nothing. A
        sealed fill holds no file descriptor (a bundle may carry thousands of POMs)."""
        if self.state != FillState.FILLING:
            raise FillFailed("fill is closed")
        if self._fd < 0 and self.digest is not None:
            return self.digest
        digest = "sha256:" + self._hash.hexdigest()
        if self.expected_size is not None and self.written != self.expected_size:
            exc = DigestMismatch(f"expected {self.expected_size} bytes, got {self.written}")
            self.fail(exc)
            raise exc
        if self.expected_digest and digest != self.expected_digest:
            exc = DigestMismatch(f"expected {self.expected_digest}, got {digest}")
            self.fail(exc)
            raise exc
        try:
            os.fsync(self._fd)
            self._close_fd()
        except OSError as exc:
            self.store.metrics.cache_store_errors.labels("io_error").inc()
            self.fail(StoreFull(f"cannot flush: {exc.strerror}"))
            raise StoreFull(str(exc)) from None
        self.digest = digest
        return digest

    def commit(self) -> str:
        """Verify and publish; returns the body's ``sha256:`` digest."""
        digest = self.seal()
        try:
            self.store._publish(self.path, digest, self.written)
        except OSError as exc:
            self.store.metrics.cache_store_errors.labels("io_error").inc()
            self.fail(StoreFull(f"cannot publish: {exc.strerror}"))
            raise StoreFull(str(exc)) from None
        self.digest = digest
        self.state = FillState.COMMITTED
        self._release_reservation()
        self._notify()
        return digest

    def fail(self, exc: BaseException) -> None:
        if self.state not in (FillState.FILLING, FillState.RELAYING):
            return
        self.state = FillState.FAILED
        self.error = exc
        self._close_fd()
        self._unlink()
        self._window.clear()
        self._window_bytes = 0
        self._release_reservation()
        self._notify()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _release_reservation(self) -> None:
        self.store._reserved -= self._reserved
        self._reserved = 0

    def _notify(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    # -- follower side --------------------------------------------------------------------
    def follow(self, start: int = 0, end: Optional[int] = None) -> "FillReader":
        """Bytes ``[start, end)`` of the body as they land; raises FillFailed if it fails.

        The reader counts as following from now (not from its first read) until it is closed
        or exhausted: a pass-through waits for it."""
        return FillReader(self, start, end)

    def _register(self, pos: int) -> int:
        rid = next(self._reader_ids)
        self._readers[rid] = pos
        return rid

    def _advance(self, rid: int, pos: int) -> None:
        self._readers[rid] = pos
        self._progress.set()

    def _unregister(self, rid: int) -> None:
        if self._readers.pop(rid, None) is not None:
            self._progress.set()

    async def _read(self, rid: int, fd: int, start: int, end: Optional[int]
                    ) -> AsyncIterator[bytes]:
        pos = start
        while True:
            # Re-evaluated after every yield: the producer may have written, committed or
            # failed while the consumer was busy, and its notification is not repeated.
            # While filling, the last byte is held back: the body is only verified at commit,
            # and a client must never receive *all* the bytes of a body that fails to verify
            # (it would take it as complete). A failed fill thus always ends truncated.
            # Passed through (relaying/relayed), nothing is verified or stored, like any
            # uncached response: the disk part, then the window.
            state = self.state
            passed = state in (FillState.RELAYING, FillState.RELAYED)
            if state == FillState.COMMITTED or passed and pos < self.written:
                available = self.written
            else:
                available = self.written - 1
            limit = available if end is None else min(available, end)
            if pos < limit:
                data = os.pread(fd, min(READ_CHUNK, limit - pos), pos)
                if not data:
                    raise FillFailed("cache file shorter than recorded")
                pos += len(data)
                self._advance(rid, pos)
                yield data
                continue
            if passed and pos < self._relay_end:
                data = self._from_window(pos)
                if end is not None:
                    data = data[:end - pos]
                pos += len(data)
                self._advance(rid, pos)
                yield data
                continue
            if state == FillState.FAILED:
                raise FillFailed(str(self.error))
            if end is not None and pos >= end:
                return
            if state in (FillState.COMMITTED, FillState.RELAYED):
                return
            # nothing new and no await since `available` was computed: no lost wakeup
            await self._wakeup.wait()

    def _from_window(self, pos: int) -> bytes:
        for offset, chunk in self._window:
            if offset <= pos < offset + len(chunk):
                return chunk[pos - offset:]
        raise PassThroughGap(f"byte {pos} of a passed-through body is no longer held")

    def _open_for_reading(self) -> int:
        if self.state == FillState.FAILED:
            raise FillFailed(str(self.error))
        if self.state == FillState.RELAYED:
            raise PassThroughGap("the passed-through body is no longer held")
        if self.state == FillState.COMMITTED:
            return os.open(self.store.path_of(self.digest), os.O_RDONLY)
        return os.open(self.path, os.O_RDONLY)


class FillReader:
    """An async iterator over a fill that is registered with it from creation until
    :meth:`aclose` (or exhaustion), so a pass-through waits for a client whose response head is
    still being sent. Errors opening the file surface on the first read, like a read error."""

    def __init__(self, fill: Fill, start: int, end: Optional[int]) -> None:
        self._fill = fill
        self._rid = fill._register(start)
        self._fd = -1
        self._gen: Optional[AsyncIterator[bytes]] = None
        self._error: Optional[BaseException] = None
        try:
            self._fd = fill._open_for_reading()
        except (FillFailed, OSError) as exc:
            self._error = exc if isinstance(exc, FillFailed) else FillFailed(str(exc))
        else:
            self._gen = fill._read(self._rid, self._fd, start, end)

    def __aiter__(self) -> "FillReader":
        return self

    async def __anext__(self) -> bytes:
        if self._gen is None:
            self._close()
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopAsyncIteration
        try:
            return await self._gen.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            await gen.aclose()
        self._close()

    def _close(self) -> None:
        self._fill._unregister(self._rid)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BlobStore:
    """See the module docstring. All methods run on the event loop thread."""

    def __init__(self, root: Path, max_size: int, min_free_space: int, metrics: Metrics,
                 max_object_size: Optional[int] = None) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.max_size = max_size
        #: the largest body stored (``cache.max_object_share`` of max_size): publishing one never
        #: evicts more than that share of the cache
        self.max_object_size = max_size if max_object_size is None else min(max_object_size,
                                                                            max_size)
        self.min_free_space = min_free_space
        self.metrics = metrics
        self._index: dict[str, BlobRecord] = {}
        self._size = 0
        self._reserved = 0

    # -- start-up ----------------------------------------------------------------------------
    def open(self, clean_tmp: bool = True) -> None:
        """Create directories, drop leftovers of interrupted fills, rebuild the index from disk.

        ``clean_tmp=False`` for a second process beside a running gateway (``bundle import``):
        the gateway's own fills in ``tmp/`` are alive, not leftovers."""
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        if clean_tmp and self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._index.clear()
        self._size = 0
        self.adopt_published()
        # the budget is exported once here (it changes only with a restart or reload of the
        # store); without it the dashboard's "disk vs budget" divides by the 0 of metrics.py
        self.metrics.cache_max_size_bytes.set(self.max_size)
        log.info("cache_opened", root=str(self.root), blobs=len(self._index), bytes=self._size)

    def adopt_published(self) -> int:
        """Index blobs on disk this process does not know yet: at start-up all of them; later
        the ones another process published (``bundle import`` beside a running gateway)."""
        added = 0
        for sub in self.blob_dir.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                name = f.name
                if len(name) != 64 or f.name.startswith("."):
                    f.unlink(missing_ok=True)
                    continue
                if "sha256:" + name in self._index:
                    continue
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                self._index["sha256:" + name] = BlobRecord(st.st_size, max(st.st_atime, st.st_mtime))
                self._size += st.st_size
                added += 1
        self._update_gauges()
        return added

    # -- lookups -------------------------------------------------------------------------------
    def path_of(self, digest: str) -> Path:
        hexpart = _hex_of(digest)
        return self.blob_dir / hexpart[:2] / hexpart

    def has(self, digest: str) -> bool:
        return digest in self._index

    def size_of(self, digest: str) -> Optional[int]:
        """The stored size of a blob, or None (bundle export sizes its members up front)."""
        rec = self._index.get(digest)
        return rec.size if rec else None

    def pin(self, digest: str) -> Optional[Path]:
        """Mark a blob as being read (never evicted meanwhile); returns its path or None."""
        rec = self._index.get(digest)
        if rec is None:
            return None
        path = self.path_of(digest)
        if not path.exists():  # removed behind our back (operator, fsck): forget it
            self._forget(digest)
            return None
        rec.pins += 1
        rec.last_access = time.time()
        return path

    def unpin(self, digest: str) -> None:
        rec = self._index.get(digest)
        if rec and rec.pins > 0:
            rec.pins -= 1

    def read_small(self, digest: str, limit: int) -> Optional[bytes]:
        """Whole body of a small blob (manifests, POMs) or None if absent/too large."""
        rec = self._index.get(digest)
        if rec is None or rec.size > limit:
            return None
        try:
            data = self.path_of(digest).read_bytes()
        except FileNotFoundError:
            self._forget(digest)
            return None
        rec.last_access = time.time()
        return data

    # -- writing -------------------------------------------------------------------------------
    def begin_fill(self, expected_digest: Optional[str] = None,
                   expected_size: Optional[int] = None, *, evict: bool = True) -> Fill:
        """Start a fill, or raise StoreFull when the body cannot be stored (serve it uncached).

        ``evict=False``: make no room now (a bundle import must not evict anything before the
        whole bundle verified; publishing makes room afterwards)."""
        need = expected_size or 0
        if need > self.max_object_size:
            raise StoreFull(f"body of {need} bytes exceeds the largest object the cache keeps "
                            f"({self.max_object_size} bytes, cache.max_object_share)")
        if evict:
            self._make_room(need + self._reserved)
        free = self.free_space()
        if free is not None and free - need < self.min_free_space:
            self.metrics.cache_store_errors.labels("disk_full").inc()
            raise StoreFull(f"only {free} bytes free on the cache filesystem")
        fill = Fill(self, expected_digest, expected_size, self.max_object_size)
        return fill

    def put_bytes(self, data: bytes) -> str:
        """Store a small in-memory body synchronously; returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest in self._index:
            self._index[digest].last_access = time.time()
            return digest
        fill = self.begin_fill(None, len(data))
        fill.write(data)
        return fill.commit()

    def _publish(self, tmp_path: Path, digest: str, size: int) -> None:
        final = self.path_of(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if digest in self._index and final.exists():
            os.unlink(tmp_path)  # same bytes arrived twice; keep the first copy
            self._index[digest].last_access = time.time()
            return
        os.rename(tmp_path, final)
        self._index[digest] = BlobRecord(size, time.time())
        self._size += size
        self._make_room(0)
        self._update_gauges()

    def free_space(self) -> Optional[int]:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    # -- eviction ------------------------------------------------------------------------------
    def _make_room(self, incoming: int) -> None:
        """Evict least recently used, unpinned blobs until ``incoming`` more bytes fit."""
        if self._size + incoming <= self.max_size:
            return
        for digest, rec in sorted(self._index.items(), key=lambda kv: kv[1].last_access):
            if self._size + incoming <= self.max_size:
                break
            if rec.pins:
                continue
            self.remove(digest)
            self.metrics.cache_evictions.inc()

    def remove(self, digest: str) -> bool:
        rec = self._index.get(digest)
        if rec is None or rec.pins:
            return False
        try:
            os.unlink(self.path_of(digest))
        except FileNotFoundError:
            pass
        self._forget(digest)
        return True

    def forget_missing(self) -> int:
        """Drop index records whose file is gone (an operator command removed them while this
        process ran); pinned blobs are open and stay. Returns how many were dropped."""
        gone = [d for d, rec in self._index.items()
                if not rec.pins and not self.path_of(d).exists()]
        for d in gone:
            self._forget(d)
        return len(gone)

    def _forget(self, digest: str) -> None:
        rec = self._index.pop(digest, None)
        if rec:
            self._size -= rec.size
            self._update_gauges()

    # -- inspection ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def count(self) -> int:
        return len(self._index)

    def digests(self) -> list[str]:
        return list(self._index)

    def verify(self, digest: str) -> bool:
        """Re-hash a stored blob; a blob that does not match its name is removed."""
        path = self.path_of(digest)
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1024 * 1024), b""):
                    h.update(chunk)
        except FileNotFoundError:
            self._forget(digest)
            return False
        if "sha256:" + h.hexdigest() != digest:
            log.error("cache_blob_corrupt", digest=digest)
            self.metrics.cache_digest_mismatches.labels("other").inc()
            self.remove(digest)
            return False
        return True

    def _update_gauges(self) -> None:
        self.metrics.cache_size_bytes.set(self._size)
        self.metrics.cache_entries.labels("blob").set(len(self._index))
