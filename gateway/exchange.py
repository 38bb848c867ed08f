"""The two objects that travel through the gateway: a request going down, a response coming up.

The client-facing proxy turns every client request (absolute-form, or origin-form inside an
intercepted TLS connection) into one :class:`Exchange` and hands it to a :class:`Handler`
(the cache/upstream pipeline), which returns a :class:`Response` whose body is a stream.
No layer buffers a body: bodies are either small ``bytes`` already in memory, a region of a file
(so a plain-HTTP connection can use ``sendfile``), or an async iterator of chunks.
"""
from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import AsyncIterator, Awaitable, Callable, Optional, Protocol

from multidict import CIMultiDict

from .hostport import join_authority

#: RFC 9110 §7.6.1 hop-by-hop fields, always removed in both directions (plus anything named in
#: the Connection header, which the proxy drops too).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})


class ClientBodyError(Exception):
    """The client side of a request body failed: bad framing, a hang-up mid-upload, a stall.

    Raised by the request body iterator handed down with an :class:`Exchange`; the upstream
    client recognises it (also when aiohttp wraps it) and never counts it against the upstream
    host (circuit breaker, retries, health): the upstream did nothing wrong."""


class InvalidHeader(ValueError):
    """A header field that cannot be sent as is (bad name, CR/LF or control characters)."""


# RFC 9110 §5.1 / §5.5 (field-name = token; field-value = field-vchar runs separated by SP/HTAB,
# obs-text allowed), as one header line
_FIELD_LINE = re.compile(
    rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+: (?:[^\x00-\x20\x7f]+(?:[ \t]+[^\x00-\x20\x7f]+)*)?\r\n")
#: (name, value) -> b"name: value\r\n"; most response headers repeat from one response to the next
_field_lines: dict[tuple[str, str], bytes] = {}


def header_line(name: str, value: str) -> bytes:
    """One validated ``Name: value\r\n`` line (latin-1, else UTF-8), memoised (bounded).

    Raises :class:`InvalidHeader` for anything that would let a value end the line or the head
    early (response splitting) or is not a token name."""
    line = _field_lines.get((name, value))
    if line is not None:
        return line
    text = f"{name}: {value}\r\n"
    try:
        line = text.encode("latin-1")
    except UnicodeEncodeError:
        line = text.encode("utf-8", "surrogateescape")
    if _FIELD_LINE.fullmatch(line) is None:
        raise InvalidHeader(f"invalid header {name[:60]!r}: {value[:60]!r}")
    if len(_field_lines) >= 4096:
        _field_lines.clear()
    _field_lines[(name, value)] = line
    return line


_ids = itertools.count(1)
_ID_PREFIX = os.urandom(3).hex()


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ids):x}"


class Origin(StrEnum):
    """Who sent an :class:`Exchange`: a client of a front door, or the gateway itself.

    Why it travels with the request: the prefetcher sends its requests through the same
    pipeline as clients (single flight, circuits, verification), but its misses and
    revalidations are not client traffic; the pipeline counts them apart, so the hit ratio an
    operator judges the cache by counts clients only."""

    CLIENT = "client"
    PREFETCH = "prefetch"


@dataclass
class Exchange:
    """One client request, as seen after the proxy protocol has been peeled off."""

    method: str
    scheme: str                     # "https" (intercepted) or "http" (absolute-form)
    host: str                       # lower-case, no port
    port: int
    target: str                     # origin-form: "/path?query"
    headers: CIMultiDict            # end-to-end request headers (hop-by-hop removed)
    body: Optional[AsyncIterator[bytes]] = None
    client: str = ""                # "ip:port" of the proxy client
    #: a front door's client, or the gateway's own prefetcher (counted apart)
    origin: Origin = Origin.CLIENT
    id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.monotonic)
    #: notes layers add for the access log (cache outcome, upstream status, kind …)
    notes: dict = field(default_factory=dict)
    #: a front door's token for requests it knows to be identical in method, scheme, host,
    #: port, target and header fields (``proxy/shapes.py``): layers below may key their memos
    #: by it instead of by those inputs. None: no such knowledge. Opaque and hashable.
    shape: Optional[object] = None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    @property
    def authority(self) -> str:
        """``host[:port]``: the upstream's identity (registries, cache keys, metric labels)."""
        return join_authority(self.host, self.port, self.scheme)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"


class Body:
    """A response body. ``length`` is the exact byte count when known (Content-Length)."""

    length: Optional[int] = None

    def chunks(self) -> AsyncIterator[bytes]:  # pragma: no cover - interface
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the body holds (file handles, upstream connections, cache pins)."""


class EmptyBody(Body):
    length = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        return
        yield b""  # pragma: no cover


class BytesBody(Body):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.data:
            yield self.data


class FileBody(Body):
    """A region of a file on disk; plain connections send it with ``loop.sendfile`` (zero-copy)."""

    def __init__(self, path: str, offset: int, length: int, chunk_size: int = 256 * 1024,
                 on_close: Optional[Callable[[], None]] = None) -> None:
        self.path = path
        self.offset = offset
        self.length = length
        self.chunk_size = chunk_size
        self._on_close = on_close
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        # Blocking reads of page-cache-hot data are faster than a thread hop per chunk; cold
        # reads on a local disk are short enough at 256 KiB not to stall the loop noticeably.
        remaining = self.length
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            while remaining > 0:
                data = f.read(min(self.chunk_size, remaining))
                if not data:
                    raise IOError(f"{self.path} is shorter than expected")
                remaining -= len(data)
                yield data

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._on_close:
                self._on_close()


class StreamBody(Body):
    """Chunks from an async iterator (upstream response, or a cache fill still growing)."""

    def __init__(self, iterator: AsyncIterator[bytes], length: Optional[int] = None,
                 on_close: Optional[Callable[[], Awaitable[None]]] = None) -> None:
        self._it = iterator
        self.length = length
        self._on_close = on_close
        self._closed = False

    def chunks(self) -> AsyncIterator[bytes]:
        return self._it

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        aclose = getattr(self._it, "aclose", None)
        if aclose:
            try:
                await aclose()
            except Exception:  # noqa: BLE001 - closing must never mask the real outcome
                pass
        if self._on_close:
            await self._on_close()


@dataclass
class Response:
    """An answer. Never changed once made (but for the proxy's ``wire`` memo): a producer may
    hand the same object to several requests (a cache hit's answer is built once per ``Age``
    second); a layer that wants other fields makes a new one (``dataclasses.replace``)."""

    status: int
    headers: CIMultiDict = field(default_factory=CIMultiDict)
    body: Body = field(default_factory=EmptyBody)
    reason: str = ""
    #: where the bytes come from, for metrics: "cache", "upstream" or "gateway"
    source: str = "gateway"
    #: ``headers`` already rendered as validated :func:`header_line` lines, in order, for
    #: producers that answer the same fields over and over (cache hits): the proxy then sends
    #: these bytes instead of rendering ``headers`` again. Must hold exactly the end-to-end
    #: fields of ``headers`` (no hop-by-hop fields, no Content-Length, no Via).
    head: Optional[bytes] = None
    #: not part of the answer: the proxy's memo of the bytes it wrote for it on a kept-alive
    #: GET — ``(Via, bytes, body length)`` — which a shared answer lets later requests reuse.
    #: ``init=False``: ``dataclasses.replace`` (another answer made from this one) starts
    #: without it, never with bytes written for different fields
    wire: Optional[tuple] = field(default=None, init=False, compare=False, repr=False)


class Handler(Protocol):
    """What the proxy calls for every intercepted or absolute-form request."""

    async def handle(self, exchange: Exchange) -> Response: ...


def error_response(status: int, message: str, *, reason: str = "",
                   headers: Optional[dict[str, str]] = None) -> Response:
    """A short plain-text answer produced by the gateway itself."""
    h = CIMultiDict({"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"})
    for k, v in (headers or {}).items():
        h[k] = v
    return Response(status, h, BytesBody((message.rstrip("\n") + "\n").encode()), reason=reason)
