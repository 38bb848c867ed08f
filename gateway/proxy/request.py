"""What the proxy knows about one client request besides its head: the header fields sorted
for forwarding, the body as a pull-based stream, and the record the access log and the request
metrics are written from."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Optional, Protocol, Union, runtime_checkable

from multidict import CIMultiDict

from ..exchange import HOP_BY_HOP, ClientBodyError, Exchange, new_request_id
from . import http1

if TYPE_CHECKING:  # pragma: no cover
    from .stream import ClientStream


class ClientGone(ClientBodyError):
    """The client closed or reset the connection (or broke the framing of its request body)."""


class AccessRecord:
    """What the access log line and the request metrics say about one request.

    A plain class whose defaults are class attributes: a record holds only what was set on it
    (made for every request; a dataclass's generated ``__init__`` of 16 fields cost ~0.6 µs)."""

    scheme: str = ""
    host: str = ""
    port: int = 0
    path: str = ""
    decision: str = "none"
    status: int = 0
    bytes: int = 0
    bytes_in: int = 0
    error: Optional[str] = None
    exchange: Optional[Exchange] = None
    established: bool = False      # a CONNECT answered 200
    door: str = "proxy"            # which listener took the request: proxy or mirror

    def __init__(self, client: str, method: str, started: float, id: Optional[str] = None) -> None:
        self.client = client
        self.method = method
        self.started = started
        self.id: str = id or new_request_id()

    @classmethod
    def of(cls, client: str, method: str, started: float, id: Optional[str] = None,
           **fields) -> "AccessRecord":
        """A record with more of its fields set (by name; an unknown name is an error)."""
        rec = cls(client, method, started, id)
        for name, value in fields.items():
            if not hasattr(AccessRecord, name):
                raise TypeError(f"AccessRecord has no field {name!r}")
            setattr(rec, name, value)
        return rec

    def __repr__(self) -> str:
        return f"AccessRecord({self.__dict__!r})"


#: request fields the proxy reads itself (besides the hop-by-hop ones, never forwarded)
_WATCHED = HOP_BY_HOP | {"host", "via", "content-length"}


class RequestFields:
    """A request's header fields, sorted in one pass: what is forwarded end to end (hop-by-hop
    fields, those named in ``Connection``, ``Host`` and ``Via`` removed) and the few the proxy
    reads itself."""

    __slots__ = ("forward", "host", "host_count", "vias", "content_length", "chunked",
                 "proxy_auth")

    def __init__(self, raw: list[tuple[str, str]]) -> None:
        forward = CIMultiDict()
        self.host: Optional[str] = None
        #: Host field lines seen (RFC 9112 §3.2: exactly one in an HTTP/1.1 request)
        self.host_count = 0
        self.vias: list[str] = []
        self.content_length: Optional[str] = None
        self.chunked = False
        self.proxy_auth: list[str] = []
        named: Optional[set[str]] = None
        for k, v in raw:
            lk = k.lower()
            if lk not in _WATCHED:
                forward.add(k, v)
            elif lk == "host":
                self.host_count += 1
                if self.host is None:
                    self.host = v
            elif lk == "via":
                self.vias.append(v)
            elif lk == "content-length":
                self.content_length = v
                forward.add(k, v)
            elif lk == "transfer-encoding":
                self.chunked = True
            elif lk == "proxy-authorization":
                self.proxy_auth.append(v)
            elif lk == "connection":
                named = named or set()
                named.update(t.strip().lower() for t in v.split(","))
        if named:
            for name in named:
                forward.popall(name, None)
        self.forward = forward


@runtime_checkable
class BodySource(Protocol):
    """Where :class:`RequestBody` pulls from (the client connection): its HTTP/1.1 state (for
    ``Expect: 100-continue``), its writer and drain (to send the ``100``), and the next body
    event off the socket (raising :class:`ClientGone` when the client's side fails)."""

    conn: http1.ServerConnection
    writer: "ClientStream"

    async def _drain(self) -> None: ...

    async def _next_body_event(self) -> Union[http1.Data, http1._Sentinel]: ...


class RequestBody:
    """The request body as an async iterator that reads the socket only when asked (backpressure).

    The pipeline may pull it from another task (aiohttp sends a request body while it reads the
    response). Once the response is sent the body is closed: later pulls fail, and if a pull is
    still in flight the connection is not reused (two readers must never share the socket).
    """

    def __init__(self, conn: BodySource, rec: AccessRecord) -> None:
        self._conn = conn
        self._rec = rec
        self.active = False
        self.closed = False
        self.done = False
        self.idle = asyncio.Event()
        self.idle.set()

    def __aiter__(self) -> "RequestBody":
        return self

    async def __anext__(self) -> bytes:
        """The next piece of the body; :class:`~gateway.exchange.ClientBodyError` when the
        client's side fails (framing, hang-up, silence), so no layer takes it for an upstream
        fault."""
        if self.done:
            raise StopAsyncIteration
        if self.closed:
            raise ClientBodyError("the request body was read after the response was sent")
        if self.active:
            raise RuntimeError("the request body is already being read")
        self.active = True
        self.idle.clear()
        try:
            conn = self._conn
            if conn.conn.they_are_waiting_for_100_continue:
                conn.writer.write(conn.conn.informational(100, b"Continue"))
                await conn._drain()
            event = await conn._next_body_event()
        except ClientGone as exc:
            raise ClientBodyError(str(exc)) from None
        finally:
            self.active = False
            self.idle.set()
        if type(event) is http1.Data:
            self._rec.bytes_in += len(event.data)
            return event.data
        if event is http1.END:
            self.done = True
            raise StopAsyncIteration
        raise ClientBodyError(f"unexpected {type(event).__name__} in the request body")

    async def aclose(self) -> None:
        self.closed = True
