"""Turning a cache entry (or a fill in progress) into a client response.

Handles what a cache owes its clients on a hit: ``Age``, RFC 9211 ``Cache-Status``, conditional
requests (``If-None-Match`` / ``If-Modified-Since`` → 304), single byte ranges (→ 206 / 416,
with ``If-Range``), HEAD, and for OCI blobs the registry headers (``Docker-Content-Digest``,
``ETag``) — hits are answered 200 with the bytes, never with the upstream's signed redirect.
"""
from __future__ import annotations

import time
from typing import AsyncIterator, Awaitable, Callable, Optional

from multidict import CIMultiDict, CIMultiDictProxy

from ..cache import BlobStore, Entry, Fill
from ..exchange import (Body, BytesBody, EmptyBody, Exchange, FileBody, InvalidHeader, Response,
                        StreamBody, header_line)
from ..observability.metrics import CacheResult
from ..resources import IMMUTABLE

CACHE_NAME = "trivy-gateway"

#: response fields never stored or replayed (the proxy frames the body itself)
NOT_STORED = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "date", "age", "set-cookie", "via",
    "cache-status", "content-range", "accept-ranges",
})


def cache_status(kind: CacheResult, *, ttl: Optional[float] = None,
                 fwd_status: Optional[int] = None, detail: Optional[str] = None,
                 stored: bool = False, collapsed: bool = False) -> str:
    """An RFC 9211 Cache-Status member for this gateway."""
    parts = [CACHE_NAME]
    if kind in (CacheResult.HIT, CacheResult.STALE, CacheResult.NEGATIVE):
        parts.append("hit")
    elif kind == CacheResult.REVALIDATED:
        parts.append("fwd=stale")
    elif kind == CacheResult.BYPASS:
        parts.append("fwd=bypass")
    else:
        parts.append("fwd=uri-miss")
    if fwd_status is not None:
        parts.append(f"fwd-status={fwd_status}")
    if ttl is not None and ttl != float("inf"):
        parts.append(f"ttl={int(ttl)}")
    if stored:
        parts.append("stored")
    if collapsed:
        parts.append("collapsed")
    if detail:
        parts.append(f"detail={detail}")
    return "; ".join(parts)


def storable_headers(headers) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in NOT_STORED]


def _etag_matches(if_none_match: str, etag: Optional[str]) -> bool:
    if not etag:
        return False
    if if_none_match.strip() == "*":
        return True
    strip = lambda t: t.strip().removeprefix("W/")  # noqa: E731 - weak comparison
    return any(strip(t) == strip(etag) for t in if_none_match.split(","))


def parse_range(value: str, size: int) -> Optional[tuple[int, int]] | str:
    """One ``bytes=`` range → (start, end exclusive); "unsatisfiable"; None to ignore Range."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # multiple ranges: answer the whole representation (allowed by RFC 9110)
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return "unsatisfiable"
            return max(0, size - n), size
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, min(end, size)


class _Rendered:
    """One entry's stored fields rendered as header lines, and the last plain answer built from
    them (its fields and head, and the responses for a GET from memory and for a HEAD), kept
    while ``Age`` and ``Cache-Status`` stay the same."""

    __slots__ = ("fields", "block", "key", "headers", "head", "view", "get", "get_body",
                 "head_only")

    def __init__(self, fields: list, block: Optional[bytes]) -> None:
        self.fields = fields
        self.block = block
        #: (entry status, Age, Cache-Status) the answer below was built for
        self.key: Optional[tuple[int, int, str]] = None
        self.headers = CIMultiDict()
        self.head: Optional[bytes] = None
        #: a read-only view of ``headers`` (what the responses below carry)
        self.view = CIMultiDictProxy(self.headers)
        #: the whole answer to a GET whose body is ``get_body`` (in memory), and to a HEAD
        self.get: Optional[Response] = None
        self.get_body: Optional[bytes] = None
        self.head_only: Optional[Response] = None


class _SharedBodies:
    """The body bytes the shared GET answers of :data:`_rendered` hold (counted twice: the
    proxy keeps the bytes it wrote for an answer on it, ``Response.wire``). Bounded by
    :data:`SHARED_BODIES_MAX`: the memory front's budget bounds the bodies it holds, and an
    entry it evicted must not stay in memory because its last answer was kept here."""

    held = 0


_shared = _SharedBodies()
#: bytes the shared answers may hold together before all of them are let go (then rebuilt
#: as they are asked for again)
SHARED_BODIES_MAX = 32 * 1024 * 1024


def _share(r: "_Rendered", answer: Response, body: bytes) -> None:
    """Keep ``answer`` (a GET from memory) as ``r``'s shared one, within the budget."""
    size = 2 * len(body)
    if _shared.held + size > SHARED_BODIES_MAX:
        for other in _rendered.values():
            other.get = other.get_body = None
        _shared.held = 0
    _unshare(r)
    r.get, r.get_body = answer, body
    _shared.held += size


def _unshare(r: "_Rendered") -> None:
    if r.get_body is not None:
        _shared.held -= 2 * len(r.get_body)
    r.get = r.get_body = None


#: id(entry.headers) -> its :class:`_Rendered`: a hot entry's stored fields are validated and
#: encoded once, not on every hit. Revalidation replaces the list (never edits it), and the list
#: is held here, so an id cannot be reused while its bytes are cached.
_rendered: dict[int, _Rendered] = {}


def _rendering(entry: Entry) -> _Rendered:
    fields = entry.headers
    known = _rendered.get(id(fields))
    if known is not None and known.fields is fields:
        return known
    if known is not None:
        _unshare(known)                          # replaced: the id now names another list
    try:
        block: Optional[bytes] = b"".join(header_line(k, v) for k, v in fields)
    except InvalidHeader:
        block = None
    if len(_rendered) >= 4096:
        _rendered.clear()
        _shared.held = 0
    known = _rendered[id(fields)] = _Rendered(fields, block)
    return known


def _rendered_fields(entry: Entry) -> Optional[bytes]:
    """The entry's stored fields as header lines; None if one of them cannot be sent as is
    (the proxy's normal path then gives the error)."""
    return _rendering(entry).block


#: (result, whole seconds of freshness left or None for immutable) -> Cache-Status value
_hit_values: dict[tuple[CacheResult, Optional[int]], str] = {}


def hit_status(result: CacheResult, ttl: float) -> str:
    """``cache_status(result, ttl=ttl)`` for a fresh hit (HIT or NEGATIVE), memoised: it only
    changes with the whole seconds of ``ttl`` (the same text as :func:`cache_status`)."""
    key = (result, None if ttl == IMMUTABLE else int(ttl))
    value = _hit_values.get(key)
    if value is None:
        if len(_hit_values) >= 4096:
            _hit_values.clear()
        value = _hit_values[key] = cache_status(result, ttl=ttl)
    return value


def _answer_fields(entry: Entry, age: int, status_value: str) -> CIMultiDict:
    """The stored fields, then ``Age`` and ``Cache-Status`` (each answer from an entry)."""
    headers = CIMultiDict(entry.headers)
    headers["Age"] = str(age)
    headers["Cache-Status"] = status_value
    return headers


def _answer_head(block: Optional[bytes], age: int, status_value: str) -> Optional[bytes]:
    """:func:`_answer_fields` as header lines: the same lines the proxy would render, in the
    same order; None if one of them cannot be sent as is."""
    if block is None:
        return None
    try:
        return block + b"Age: %d\r\n" % age + header_line("Cache-Status", status_value)
    except InvalidHeader:
        return None


def _plain_answer(entry: Entry, age: int, status_value: str) -> _Rendered:
    """Fields and head of the whole stored response (no validator matched, no range asked):
    the stored fields, ``Age``, ``Cache-Status``, ``Accept-Ranges`` (for a 200). Built once
    per entry per (``Age``, ``Cache-Status``): a hot entry is asked for many times a second.
    The fields are shared (a read-only view)."""
    r = _rendering(entry)
    key = (entry.status, age, status_value)
    if r.key != key:
        headers = _answer_fields(entry, age, status_value)
        head = _answer_head(r.block, age, status_value)
        if entry.status == 200:
            headers["Accept-Ranges"] = "bytes"
            if head is not None:
                head += b"Accept-Ranges: bytes\r\n"
        r.key, r.headers, r.head = key, headers, head
        r.view = CIMultiDictProxy(headers)
        _unshare(r)
        r.head_only = None
    return r


def response_from_entry(ex: Exchange, entry: Entry, body: Optional[bytes], blobs: BlobStore,
                        status_value: str, chunk_size: int = 256 * 1024,
                        now: Optional[float] = None, whole: Optional[bool] = None) -> Response:
    """Answer ``ex`` from a stored entry (hit, stale, negative, revalidated); ``now``: the
    pipeline's clock (for ``Age``); ``whole``: the request has none of ``If-None-Match``,
    ``If-Modified-Since`` and ``Range`` (None: look)."""
    now = time.time() if now is None else now
    age = max(0, int(now - entry.validated_at))
    status = entry.status
    size = entry.body_size
    req = ex.headers
    if whole is None:
        whole = not ("If-None-Match" in req or "If-Modified-Since" in req or "Range" in req)
    if status != 200 or whole:
        # what most hits are: the whole stored response (what the lines below give for them).
        # Answers without a per-request resource (a body in memory, none) are built once per
        # (Age, Cache-Status) and shared: a Response is never changed once made
        r = _plain_answer(entry, age, status_value)
        if ex.method == "HEAD":
            answer = r.head_only
            if answer is None:
                answer = r.head_only = Response(status, r.view, HeadBody(size),  # type: ignore[arg-type]
                                                source="cache", head=r.head)
            return answer
        if body is not None:
            answer = r.get
            if answer is None or r.get_body is not body:
                answer = Response(status, r.view,  # type: ignore[arg-type]
                                  _entry_body(entry, body, blobs, 0, size, chunk_size),
                                  source="cache", head=r.head)
                _share(r, answer, body)
            return answer
        return Response(status, r.view, _entry_body(entry, body, blobs, 0, size, chunk_size),  # type: ignore[arg-type]
                        source="cache", head=r.head)
    headers = _answer_fields(entry, age, status_value)
    inm = req.get("If-None-Match")
    if status == 200 and inm is not None and _etag_matches(inm, entry.etag):
        return _not_modified(headers)
    ims = req.get("If-Modified-Since")
    if status == 200 and inm is None and ims and entry.last_modified == ims:
        return _not_modified(headers)
    start, end = 0, size
    rng = req.get("Range")
    if rng and status == 200 and ex.method == "GET":
        if_range = req.get("If-Range")
        if if_range is None or if_range == entry.etag or if_range == entry.last_modified:
            parsed = parse_range(rng, size)
            if parsed == "unsatisfiable":
                h = CIMultiDict({"Content-Range": f"bytes */{size}", "Cache-Status": status_value})
                return Response(416, h, EmptyBody(), source="cache")
            if parsed is not None:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if entry.status == 200:
        headers["Accept-Ranges"] = "bytes"
    head = _answer_head(_rendered_fields(entry), age, status_value)
    if head is not None:
        if status == 206:
            head += b"Content-Range: bytes %d-%d/%d\r\n" % (start, end - 1, size)
        if entry.status == 200:
            head += b"Accept-Ranges: bytes\r\n"
    if ex.method == "HEAD":
        return Response(status, headers, HeadBody(end - start), source="cache", head=head)
    return Response(status, headers, _entry_body(entry, body, blobs, start, end, chunk_size),
                    source="cache", head=head)


def _not_modified(headers: CIMultiDict) -> Response:
    keep = ("etag", "cache-control", "expires", "last-modified", "vary", "age", "cache-status",
            "docker-content-digest", "content-location")
    h = CIMultiDict((k, v) for k, v in headers.items() if k.lower() in keep)
    return Response(304, h, EmptyBody(), source="cache")


class HeadBody(EmptyBody):
    """No bytes, but the length the GET would have (Content-Length of a HEAD response)."""

    def __init__(self, length: int) -> None:
        self.length = length


def _entry_body(entry: Entry, body: Optional[bytes], blobs: BlobStore, start: int, end: int,
                chunk_size: int) -> Body:
    if entry.body_digest is None or end <= start:
        return EmptyBody()
    if body is not None:
        return BytesBody(body[start:end] if (start, end) != (0, len(body)) else body)
    digest = entry.body_digest
    path = blobs.pin(digest)
    if path is None:
        raise LookupError(f"blob {digest} vanished")
    return FileBody(str(path), start, end - start, chunk_size, on_close=lambda: blobs.unpin(digest))


def response_from_fill(ex: Exchange, status: int, headers: CIMultiDict, fill: Fill,
                       status_value: str, chunks: Optional[AsyncIterator[bytes]] = None,
                       on_close: Optional[Callable[[], Awaitable[None]]] = None) -> Response:
    """Answer from a fill still being written (the miss leader and coalesced followers).

    ``chunks`` replaces ``fill.follow()`` when the caller wraps it (e.g. to finish from the
    upstream if the disk fails mid-fill); ``on_close`` then releases what it wraps."""
    h = CIMultiDict(headers)
    h["Cache-Status"] = status_value
    length = fill.expected_size
    if ex.method == "HEAD":
        return Response(status, h, HeadBody(length) if length is not None else EmptyBody(),
                        source="upstream")
    return Response(status, h, StreamBody(chunks or fill.follow(), length, on_close=on_close),
                    source="upstream")
