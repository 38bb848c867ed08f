"""Cached responses: metadata on disk (one JSON file per key), bodies in the blob store.

An :class:`Entry` is what a later request needs to answer without the upstream: status,
headers to replay, the digest of the body in the :class:`~gateway.cache.blobstore.BlobStore`,
and the freshness facts (when it was last validated, until when it is fresh, its validators).

Metadata writes are ``write tmp + fsync + rename``, so a crash leaves either the old or the new
entry, never half of one. An entry whose body blob is missing is treated as absent.

A memory front (aiocache; ``memory`` per process, ``redis`` to share between replicas) holds
hot entries together with small bodies, so a hit on a manifest, token or POM touches no disk.
Why a byte budget around aiocache: its memory backend has no size bound of its own. Why a dict
of parsed hot values in front of aiocache, and when it may answer: :class:`_MemoryFront`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from aiocache import Cache as AioCache
from aiocache.serializers import BaseSerializer

from ..observability.logging import get_logger
from ..observability.metrics import Metrics
from ..settings import MemoryFrontSettings

log = get_logger("gateway.cache")


@dataclass
class Entry:
    key: str
    kind: str
    status: int
    headers: list[tuple[str, str]]
    body_digest: Optional[str]
    body_size: int
    #: when the upstream last confirmed this content (fetch or successful revalidation)
    validated_at: float
    #: fresh until this time (inf for immutable content)
    fresh_until: float
    #: first stored (age of the content itself)
    stored_at: float = field(default_factory=time.time)
    etag: Optional[str] = None
    last_modified: Optional[str] = None
    negative: bool = False
    #: free-form facts for the status page (reference, docker digest, upstream url …)
    meta: dict = field(default_factory=dict)
    #: ``Vary``: the nominated request fields and the values the stored response's request had
    #: (None: the response does not vary); only a request with the same values may reuse it
    vary: Optional[dict[str, Optional[str]]] = None

    # Freshness takes ``now`` from the caller's clock (the pipeline's injected clock); wall
    # time when omitted (operator commands).
    def is_fresh(self, now: Optional[float] = None) -> bool:
        return (time.time() if now is None else now) < self.fresh_until

    def staleness(self, now: Optional[float] = None) -> float:
        """Seconds past expiry (0 while fresh)."""
        return max(0.0, (time.time() if now is None else now) - self.fresh_until)

    def ttl_left(self, now: Optional[float] = None) -> float:
        return self.fresh_until - (time.time() if now is None else now)

    def header(self, name: str) -> Optional[str]:
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def to_json(self) -> str:
        d = asdict(self)
        if d["fresh_until"] == float("inf"):
            d["fresh_until"] = "inf"
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Entry":
        d = json.loads(text)
        if d.get("fresh_until") == "inf":
            d["fresh_until"] = float("inf")
        d["headers"] = [tuple(h) for h in d["headers"]]
        return cls(**d)


def _file_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class _FrontSerializer(BaseSerializer):
    """(entry, body or None) ⇄ bytes for Redis. Not pickle: a shared Redis must not be able to
    make the gateway execute anything; this format only ever yields an Entry and bytes."""

    DEFAULT_ENCODING = None

    def dumps(self, value: tuple["Entry", Optional[bytes]]) -> bytes:
        meta = value[0].to_json().encode()
        flag = b"\x00" if value[1] is None else b"\x01"
        return len(meta).to_bytes(4, "big") + meta + flag + (value[1] or b"")

    def loads(self, value: Optional[bytes]) -> Optional[tuple["Entry", Optional[bytes]]]:
        if value is None:
            return None
        n = int.from_bytes(value[:4], "big")
        entry = Entry.from_json(value[4:4 + n].decode())
        body = None if value[4 + n:5 + n] == b"\x00" else bytes(value[5 + n:])
        return entry, body


#: a hot value's "served until" when nothing but this process can change it (memory backend)
_FOREVER = float("inf")
#: with the shared (Redis) backend, how long a replica serves an immutable entry from its own
#: process before asking Redis again (see :class:`_MemoryFront`)
SHARED_HOT_SECONDS = 1.0
#: with the shared (Redis) backend, after a failed call Redis is skipped (answers come from this
#: process and the disk) for this long
REDIS_RETRY_SECONDS = 1.0
#: file in the entries directory the operator commands touch after purging (not an entry)
PURGE_MARKER = ".operator-changed"
#: how often a running gateway looks at it (one stat; a purge takes effect within this)
PURGE_CHECK_INTERVAL = 1.0
#: file in the entries directory naming the key format its entries are stored under (not an
#: entry; written by :mod:`gateway.cache.keyformat` once older keys have been migrated)
FORMAT_MARKER = ".key-format"


def write_atomically(path: Path, text: str) -> None:
    """``write tmp + fsync + rename``: a crash leaves the old file or the new one, never half
    of one (a torn ``.tmp`` is removed by :meth:`EntryStore.open`)."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


class _MemoryFront:
    """aiocache with an LRU byte budget, and a dict of parsed hot values in front of it.

    Values: (Entry, small body or None).

    Why the ``_hot`` dict: every aiocache call goes through its decorators (enabled check reading
    ``os.environ``, timeout, plugin hooks) before reaching a dict lookup; on a small hit that was
    most of the cost of the lookup. aiocache stays the configured backend (every write goes
    through it, and Redis shares entries between replicas); reads are answered from ``_hot``
    when it is allowed to answer:

    - ``memory`` backend: ``_hot`` holds exactly what was put into aiocache by this process
      (set, delete, eviction and clear update both, in the same LRU order), so it is coherent
      by construction and every hit is served from it.
    - ``redis`` backend: other replicas write too, so a mutable entry (tag manifest, metadata,
      GitHub, negative) is always read from Redis: a replica sees another's revalidation or new
      version at once, as before. Only immutable entries (content-addressed blobs and
      manifests, Maven release files: ``fresh_until`` = inf, not negative) are kept, for
      :data:`SHARED_HOT_SECONDS`: their content cannot change, another replica can only
      delete them (e.g. its copy of the blob vanished), and that is seen within that time.
      Large bodies are still checked against this replica's own blob store on every hit
      (:meth:`EntryStore.get`).
    """

    def __init__(self, settings: MemoryFrontSettings,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        #: clock of the shared hot window (injected: tests move it instead of sleeping)
        self.monotonic = monotonic
        self.shared = settings.backend == "redis"
        if self.shared:
            from urllib.parse import urlparse  # noqa: PLC0415 - only needed for redis

            url = urlparse(settings.redis_url)
            self.cache = AioCache(AioCache.REDIS, endpoint=url.hostname or "127.0.0.1",
                                  port=url.port or 6379, db=int((url.path or "/0")[1:] or 0),
                                  namespace="trivy-gateway:", serializer=_FrontSerializer(),
                                  password=url.password, timeout=2)
        else:
            # timeouts are meaningless for a dict lookup: no per-call wait_for
            self.cache = AioCache(AioCache.MEMORY, timeout=None)
        #: after a failed Redis call, Redis is not asked again before this (monotonic) time:
        #: a Redis that does not answer must not cost every request its timeout
        self._redis_skip_until = 0.0
        #: key → size of what this process put into the backend (its byte budget, LRU order)
        self._sizes: "OrderedDict[str, int]" = OrderedDict()
        self._total = 0
        #: key → (value, size, served until (monotonic)); LRU order, same byte budget
        self._hot: "OrderedDict[str, tuple[tuple[Entry, Optional[bytes]], int, float]]" = \
            OrderedDict()
        self._hot_total = 0

    @staticmethod
    def _size(entry: Entry, body: Optional[bytes]) -> int:
        return 512 + len(entry.headers) * 64 + (len(body) if body else 0)

    def _hot_put(self, key: str, value: tuple[Entry, Optional[bytes]], size: int) -> None:
        if self.shared:
            entry = value[0]
            if entry.fresh_until != float("inf") or entry.negative:
                return
            until = self.monotonic() + SHARED_HOT_SECONDS
        else:
            until = _FOREVER
        self._hot_pop(key)
        self._hot[key] = (value, size, until)
        self._hot_total += size
        while self._hot_total > self.settings.max_size and self._hot:
            _, (_, old_size, _) = self._hot.popitem(last=False)
            self._hot_total -= old_size

    def _hot_pop(self, key: str) -> None:
        old = self._hot.pop(key, None)
        if old is not None:
            self._hot_total -= old[1]

    def peek(self, key: str) -> Optional[tuple[Entry, Optional[bytes]]]:
        """The hot value, when ``_hot`` may answer for ``key`` without awaiting; None otherwise
        (not known here: ask :meth:`get`). Same LRU bookkeeping as a hit through :meth:`get`."""
        hot = self._hot.get(key)
        if hot is None:
            return None
        if hot[2] == _FOREVER or hot[2] > self.monotonic():
            self._hot.move_to_end(key)
            if key in self._sizes:
                self._sizes.move_to_end(key)
            return hot[0]
        self._hot_pop(key)
        return None

    async def get(self, key: str) -> Optional[tuple[Entry, Optional[bytes]]]:
        hot = self.peek(key)
        if hot is not None:
            return hot
        if self._skipping():
            return None  # a miss here; the disk is the truth
        try:
            value = await self.cache.get(key)
        except Exception as exc:  # noqa: BLE001 - a broken Redis must not fail requests
            self._unavailable(exc)
            return None
        if value is not None:
            if key in self._sizes:
                self._sizes.move_to_end(key)
            if self.shared:
                self._hot_put(key, value, self._size(*value))
        return value

    async def set(self, key: str, entry: Entry, body: Optional[bytes]) -> None:
        if body is not None and len(body) > self.settings.max_item_size:
            body = None
        size = self._size(entry, body)
        await self.delete(key)
        if self._skipping():
            return
        try:
            await self.cache.set(key, (entry, body))
        except Exception as exc:  # noqa: BLE001
            self._unavailable(exc)
            return
        self._sizes[key] = size
        self._total += size
        self._hot_put(key, (entry, body), size)
        while self._total > self.settings.max_size and self._sizes:
            old, old_size = self._sizes.popitem(last=False)
            self._total -= old_size
            self._hot_pop(old)
            try:
                await self.cache.delete(old)
            except Exception:  # noqa: BLE001
                pass

    def _skipping(self) -> bool:
        return self.shared and self.monotonic() < self._redis_skip_until

    def _unavailable(self, exc: BaseException) -> None:
        if self.shared:
            self._redis_skip_until = self.monotonic() + REDIS_RETRY_SECONDS
        log.warning("memory_front_unavailable", error=str(exc) or type(exc).__name__,
                    retry_in=REDIS_RETRY_SECONDS if self.shared else None)

    async def delete(self, key: str) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._total -= size
        self._hot_pop(key)
        if self._skipping():
            return  # Redis does not answer: it could not be deleted there anyway
        try:
            await self.cache.delete(key)
        except Exception as exc:  # noqa: BLE001
            self._unavailable(exc)

    async def clear(self) -> None:
        """Forget what this process holds. With Redis, only this process's views: aiocache's
        Redis ``clear`` is a FLUSHDB, which would also wipe the fleet's circuits, leases,
        budget, peer token and holders (and anything else in that database); the operator
        command that changed the cache deletes the keys it purged from Redis itself."""
        self._sizes.clear()
        self._total = 0
        self._hot.clear()
        self._hot_total = 0
        if self.shared:
            return
        try:
            await self.cache.clear()
        except Exception as exc:  # noqa: BLE001 - a broken Redis must not fail requests
            self._unavailable(exc)


class EntryStore:
    def __init__(self, root: Path, blobs, memory: MemoryFrontSettings, metrics: Metrics,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.dir = Path(root) / "entries"
        self.blobs = blobs
        self.metrics = metrics
        self.monotonic = monotonic
        self.front = _MemoryFront(memory, monotonic)
        self.small_limit = memory.max_item_size
        self._count = 0
        #: touched by ``trivy-gateway cache purge|verify`` (another process): a running gateway
        #: drops its memory front when it changes, so purged entries stop being served
        self.purge_marker = self.dir / PURGE_MARKER
        self._marker_mtime: Optional[int] = None
        self._marker_checked = 0.0

    def open(self) -> None:
        """Create the directory, drop torn temp files and entries whose body is gone."""
        self.dir.mkdir(parents=True, exist_ok=True)
        count = 0
        for f in self.dir.iterdir():
            if f.name in (PURGE_MARKER, FORMAT_MARKER):
                continue
            if f.name.endswith(".tmp"):
                f.unlink(missing_ok=True)
                continue
            try:
                entry = Entry.from_json(f.read_text("utf-8"))
            except (ValueError, TypeError, KeyError, OSError):
                log.warning("cache_entry_unreadable", file=f.name)
                f.unlink(missing_ok=True)
                continue
            if entry.body_digest and not self.blobs.has(entry.body_digest):
                f.unlink(missing_ok=True)
                continue
            count += 1
        self._count = count
        self.metrics.cache_entries.labels("response").set(count)
        self._marker_mtime = self._marker_stamp()
        self._marker_checked = self.monotonic()

    def _path(self, key: str) -> Path:
        return self.dir / (_file_name(key) + ".json")

    def _marker_stamp(self) -> Optional[int]:
        try:
            return self.purge_marker.stat().st_mtime_ns
        except OSError:
            return None

    async def _check_purge_marker(self) -> None:
        """(At most once per :data:`PURGE_CHECK_INTERVAL`.) Has an operator command changed the
        cache behind this process's back? Then forget what memory holds (disk is the truth)."""
        self._marker_checked = self.monotonic()
        stamp = self._marker_stamp()
        if stamp != self._marker_mtime:
            self._marker_mtime = stamp
            await self.front.clear()
            for sync in ("forget_missing", "adopt_published"):  # removed / imported blobs
                method = getattr(self.blobs, sync, None)
                if method is not None:
                    method()
            self._count = sum(1 for _ in self.dir.glob("*.json"))
            self.metrics.cache_entries.labels("response").set(self._count)
            log.info("cache_changed_by_operator", marker=str(self.purge_marker))

    def mark_purged(self) -> None:
        """Called by the operator commands after they removed entries or blobs."""
        self.purge_marker.write_text(f"{time.time():.6f}\n", encoding="utf-8")

    def peek(self, key: str) -> Optional[tuple[Entry, Optional[bytes]]]:
        """:meth:`get`'s answer when it is known without awaiting: the memory front's hot value
        with its body in memory (or no body), and no purge-marker check due. None means "not
        known here", not "absent": the caller then awaits :meth:`get`."""
        if self.monotonic() - self._marker_checked >= PURGE_CHECK_INTERVAL:
            return None
        cached = self.front.peek(key)
        if cached is None:
            return None
        entry = cached[0]
        if entry.body_digest is None:
            return entry, b""
        if cached[1] is not None:
            return entry, cached[1]
        return None                              # body on disk: get() checks the blob store

    async def get(self, key: str) -> Optional[tuple[Entry, Optional[bytes]]]:
        """The entry and, when small enough to be in memory, its body."""
        if self.monotonic() - self._marker_checked >= PURGE_CHECK_INTERVAL:
            await self._check_purge_marker()
        cached = await self.front.get(key)
        if cached is not None:
            entry = cached[0]
            if entry.body_digest is None:
                return entry, b""
            if cached[1] is not None:
                # small body held by the front itself (with Redis: possibly stored by another
                # replica, verified when that replica filled it)
                return entry, cached[1]
            if self.blobs.has(entry.body_digest):
                return entry, None
            # a large body this replica does not hold: a miss here, but leave the shared entry
        try:
            text = self._path(key).read_text("utf-8")
        except FileNotFoundError:
            return None
        try:
            entry = Entry.from_json(text)
        except (ValueError, TypeError, KeyError):
            self._path(key).unlink(missing_ok=True)
            return None
        if entry.key != key:  # hash collision or a foreign file: never serve it
            return None
        if entry.body_digest and not self.blobs.has(entry.body_digest):
            await self.delete(key)
            return None
        body = b"" if entry.body_digest is None else self.blobs.read_small(entry.body_digest,
                                                                           self.small_limit)
        await self.front.set(key, entry, body)
        return entry, body

    async def put(self, entry: Entry, body: Optional[bytes] = None) -> None:
        path = self._path(entry.key)
        existed = path.exists()
        write_atomically(path, entry.to_json())
        if not existed:
            self._count += 1
            self.metrics.cache_entries.labels("response").set(self._count)
        await self.front.set(entry.key, entry, body)

    async def delete(self, key: str) -> None:
        await self.front.delete(key)
        try:
            self._path(key).unlink()
            self._count -= 1
            self.metrics.cache_entries.labels("response").set(self._count)
        except FileNotFoundError:
            pass

    def iter_entries(self):
        """All entries on disk (operator commands, status page)."""
        for f in sorted(self.dir.glob("*.json")):
            try:
                yield Entry.from_json(f.read_text("utf-8"))
            except (ValueError, TypeError, KeyError, OSError):
                continue

    @property
    def count(self) -> int:
        return self._count
