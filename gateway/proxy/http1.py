"""HTTP/1.1, server side: a small explicit state machine with llhttp (httptools) as the parser.

The connection code pulls *events* from it one at a time, h11-style — :class:`RequestHead`,
:class:`Data`, :data:`END` (end of the request), :data:`CLOSED` (clean close between requests)
or :data:`NEED_DATA` — and asks it to frame responses (:meth:`ServerConnection.start_response`,
:meth:`~ServerConnection.send_data`, :meth:`~ServerConnection.end_response`). It does no I/O.

Why not h11, which the first version used: a cache hit is a few hundred microseconds of work in
total, and h11 — pure Python — spent ~55 µs of it per request parsing and framing (measured with
``bench/run.py --only small --profile``). llhttp is Node.js's parser, in C (~2 µs per request
here), and strict by default where request smuggling lives: it rejects obsolete line folding,
whitespace before the colon, duplicate ``Content-Length``, ``Content-Length`` together with
``Transfer-Encoding``, bare-LF line ends and bad characters in names and values. httptools is its
maintained Python binding (the one uvicorn uses).

What this module adds to the parser, as explicit state:

* ``their_state``: ``IDLE`` → ``SEND_BODY`` → ``DONE``; ``MUST_CLOSE`` after a request that does
  not allow another one; ``ERROR`` once the byte stream is unusable.
* ``our_state``: ``IDLE`` → ``SEND_BODY`` (head sent) → ``DONE`` / ``MUST_CLOSE``.
* response framing: ``Content-Length`` counted (a body longer or shorter than declared is a
  :class:`LocalProtocolError`, so a truncated body never looks complete), chunked for an
  HTTP/1.1 client when the length is unknown, close-delimited for HTTP/1.0; no body and no
  length for 1xx/204, a length but no body for HEAD and 304;
* keep-alive: only when the request allows it (HTTP/1.1 without ``Connection: close``; HTTP/1.0
  connections always close) and the response was framed by length or chunks;
* the request head limit (``max_head_bytes``, answered 431) — llhttp itself has none;
* ``Expect: 100-continue`` bookkeeping; the ``CONNECT`` switch (the bytes after its head are
  kept as :attr:`~ServerConnection.trailing_data`, never parsed as HTTP).

The parser consumes everything it is fed, so events for pipelined requests are queued; the
connection reads from the socket only when the queue is empty, which bounds it by one read.
"""
from __future__ import annotations

from collections import deque
from typing import Optional, Union

import httptools

__all__ = [
    "NEED_DATA", "END", "CLOSED", "RequestHead", "Data", "ServerConnection",
    "ProtocolError", "RemoteProtocolError", "LocalProtocolError",
    "IDLE", "SEND_BODY", "DONE", "MUST_CLOSE", "SWITCHED", "ERROR",
]


class ProtocolError(Exception):
    """Base of both error kinds; ``error_status_hint`` is the status to answer with."""

    def __init__(self, message: str, error_status_hint: int = 400) -> None:
        super().__init__(message)
        self.error_status_hint = error_status_hint


class RemoteProtocolError(ProtocolError):
    """The client sent something that is not valid HTTP/1.1 (or too large)."""


class LocalProtocolError(ProtocolError):
    """The gateway tried to send something invalid (bad header, body not matching its length)."""


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


IDLE = _Sentinel("IDLE")
SEND_BODY = _Sentinel("SEND_BODY")
DONE = _Sentinel("DONE")
MUST_CLOSE = _Sentinel("MUST_CLOSE")
SWITCHED = _Sentinel("SWITCHED")
ERROR = _Sentinel("ERROR")

#: the parser needs more bytes before it can say what comes next
NEED_DATA = _Sentinel("NEED_DATA")
#: the request (head and body) is complete
END = _Sentinel("END")
#: the client closed the connection cleanly between requests
CLOSED = _Sentinel("CLOSED")


class RequestHead:
    """A parsed request head. Names and values are latin-1 decoded, as they arrived."""

    __slots__ = ("method", "target", "headers", "http_version", "keep_alive", "upgrade",
                 "expects_continue")

    def __init__(self, method: str, target: str, headers: list[tuple[str, str]],
                 http_version: str, keep_alive: bool, upgrade: bool = False) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version
        #: the request allows another one on this connection
        self.keep_alive = keep_alive
        #: CONNECT, or Upgrade + Connection: upgrade: the parser stopped after this head
        self.upgrade = upgrade
        #: ``Expect: 100-continue`` in an HTTP/1.1 head (found once, by the first
        #: ``_begin_request``: a replayed head is not searched again); None: not looked yet
        self.expects_continue: Optional[bool] = None

    def __repr__(self) -> str:
        return f"RequestHead({self.method} {self.target[:80]} HTTP/{self.http_version})"


class Data:
    """A piece of the request body (chunked framing already removed)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


Event = Union[RequestHead, Data, _Sentinel]


class _HeadTooLarge(Exception):
    pass


class _Error:
    """Queued in place of the event a parse error prevented (earlier events stay usable)."""

    __slots__ = ("exc",)

    def __init__(self, exc: RemoteProtocolError) -> None:
        self.exc = exc


_CHUNKED_END = b"0\r\n\r\n"


class ServerConnection:
    """One client connection's HTTP/1.1 state. Not thread-safe; one per connection."""

    def __init__(self, max_head_bytes: int = 64 * 1024) -> None:
        self.max_head_bytes = max_head_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._events: deque = deque()
        self.their_state = IDLE
        self.our_state = IDLE
        #: bytes after a CONNECT head (never parsed); the flag: the client closed its side
        self._trailing = b""
        self._eof = False
        #: the parser stopped at a CONNECT / Upgrade head; later bytes are kept, not parsed
        self._stopped = False
        #: the byte stream broke (parse error, head too large): later bytes are ignored
        self._broken = False
        # the message being parsed
        self._in_message = False
        self._head_done = False
        self._head_size = 0              # exact: url + header names/values as they complete
        self._head_pending = 0           # bytes fed while the head was incomplete (bound)
        self._message_began_first = False
        self._completed_in_feed = False
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._request_keep_alive = True
        self._head_request = False
        self._connect = False
        #: the client sent ``Expect: 100-continue`` and has had no answer and sent no body yet
        self.they_are_waiting_for_100_continue = False
        # the response being sent
        self._remaining: Optional[int] = None     # bytes still due under Content-Length
        self._chunked = False
        self._no_body = False
        self._response_keep_alive = True
        self._http10 = False

    # -- parser callbacks (llhttp calls them from feed_data) ----------------------------------
    def on_message_begin(self) -> None:
        self._in_message = True
        self._head_done = False
        self._head_size = 16             # request line beyond the target
        self._head_pending = 0
        self._message_began_first = not self._completed_in_feed
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        # called once per piece when the target is split across reads (headers, by contrast,
        # are accumulated by httptools and arrive whole)
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if not self._head_done:          # after the head: chunked trailers, dropped
            self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def _count(self, n: int) -> None:
        self._head_size += n
        if self._head_size > self.max_head_bytes:
            raise _HeadTooLarge()

    def on_headers_complete(self) -> None:
        self._head_done = True
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise RemoteProtocolError(f"unsupported HTTP version {version}", 505)
        method = parser.get_method().decode("ascii", "replace")
        keep_alive = version == "1.1" and parser.should_keep_alive()
        head = RequestHead(method, self._url.decode("latin-1"), self._headers, version,
                           keep_alive, parser.should_upgrade())
        self._headers = []
        self._events.append(head)

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._in_message = False
        self._completed_in_feed = True
        self._events.append(END)

    # -- receiving ----------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the client; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
            return
        if self._stopped:
            self._trailing += data       # after CONNECT (or an Upgrade) the bytes are not HTTP
            return
        if self._broken:
            return                       # the stream already failed: nothing more is parsed
        self._completed_in_feed = False
        head_was_open = self._in_message and not self._head_done
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._trailing = data[offset:]
            self._stopped = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadTooLarge):
                self._fail(RemoteProtocolError("request head too large", 431))
            elif isinstance(cause, RemoteProtocolError):
                self._fail(cause)
            else:
                self._fail(RemoteProtocolError(f"malformed request: {cause or exc}"))
        except httptools.HttpParserError as exc:
            self._fail(RemoteProtocolError(str(exc) or type(exc).__name__))
        else:
            if self._in_message and not self._head_done:
                # an incomplete head: bound what it may take (llhttp buffers nothing, httptools
                # keeps the current token); a head that began mid-feed after another request
                # is counted from the next feed on
                if head_was_open or self._message_began_first:
                    self._head_pending += len(data)
                if self._head_pending > self.max_head_bytes:
                    self._fail(RemoteProtocolError("request head too large", 431))

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._events.append(_Error(exc))
        self._in_message = False
        self._broken = True

    def next_event(self) -> Event:
        """The next event; raises :class:`RemoteProtocolError` at the point the input broke."""
        events = self._events
        if events:
            state = self.their_state
            if state is DONE or state is MUST_CLOSE or state is SWITCHED:
                return NEED_DATA         # the next request waits for start_next_cycle()
            event = events[0]
            if state is IDLE:
                if type(event) is RequestHead:
                    events.popleft()
                    self._begin_request(event)
                    return event
            elif state is SEND_BODY:
                if type(event) is Data:
                    events.popleft()
                    self.they_are_waiting_for_100_continue = False
                    return event
                if event is END:
                    events.popleft()
                    self.their_state = SWITCHED if self._connect else (
                        DONE if self._request_keep_alive else MUST_CLOSE)
                    return END
            if type(event) is _Error:
                self.their_state = ERROR
                raise event.exc
            self.their_state = ERROR     # cannot happen with llhttp's callback order
            raise RemoteProtocolError(f"unexpected {event!r} in state {state!r}")
        if self.their_state is ERROR:
            raise RemoteProtocolError("the request stream is broken")
        if self._eof:
            if self.their_state is IDLE and not self._in_message:
                return CLOSED
            if self.their_state is not IDLE and self.their_state is not SEND_BODY:
                return NEED_DATA
            self.their_state = ERROR
            raise RemoteProtocolError("the client closed the connection in the middle of a "
                                      "request")
        return NEED_DATA

    def _begin_request(self, head: RequestHead) -> None:
        self.their_state = SEND_BODY
        self._request_keep_alive = head.keep_alive
        self._http10 = head.http_version == "1.0"
        self._head_request = head.method == "HEAD"
        self._connect = head.method == "CONNECT"
        if head.upgrade and not self._connect:
            # an Upgrade request (websocket, h2c) is served as a plain request, never switched.
            # The parser stopped at its head: nothing after it can be read as HTTP, so it must
            # not have a body, and the connection ends with it.
            self._request_keep_alive = False
            for name, value in head.headers:
                lname = name.lower()
                if lname == "transfer-encoding" or (lname == "content-length"
                                                    and value.strip() not in ("", "0")):
                    self.their_state = ERROR
                    raise RemoteProtocolError("a request with Upgrade must not have a body")
        expects = head.expects_continue
        if expects is None:
            expects = head.expects_continue = not self._http10 and any(
                len(name) == 6 and name.lower() == "expect"
                and value.strip().lower() == "100-continue" for name, value in head.headers)
        self.they_are_waiting_for_100_continue = expects

    @property
    def at_rest(self) -> bool:
        """Between two requests with nothing buffered: the next bytes begin a new request, and
        the parser is in the state it returns to after every complete request."""
        return (self.their_state is IDLE and self.our_state is IDLE and not self._events
                and not self._in_message and not self._stopped and not self._broken
                and not self._eof)

    def replay(self, head: RequestHead) -> bool:
        """Take ``head`` as the next request, complete and bodyless, if the machine is
        :attr:`at_rest` (else False, nothing changed): the transitions ``next_event()`` makes
        when it returns ``head`` and then :data:`END`.

        For a head this machine parsed before *at rest* from one whole chunk that held exactly
        that request (no body, no Upgrade, not CONNECT): llhttp at rest turns the same bytes
        into the same events, so the caller may skip feeding them (``proxy/shapes.py``). The
        parser is left at rest, which is where it would be after those bytes. (One call that
        checks and replays: it runs on every replayed request.)
        """
        if not (self.their_state is IDLE and self.our_state is IDLE and not self._events
                and not self._in_message and not self._stopped and not self._broken
                and not self._eof):                     # at_rest
            return False
        if head.upgrade or head.method == "CONNECT":
            raise LocalProtocolError("a head with a switch cannot be replayed")
        self._begin_request(head)
        self.their_state = DONE if self._request_keep_alive else MUST_CLOSE
        return True

    @property
    def plain_keep_alive(self) -> bool:
        """A complete HTTP/1.1 request that allows another one, not HEAD, is waiting for its
        response: the inputs under which :meth:`replay_response` may stand for a response
        framed by length before."""
        return (self.their_state is DONE and self.our_state is IDLE and self._request_keep_alive
                and not self._http10 and not self._head_request)

    def replay_response(self) -> bool:
        """The transitions of ``start_response(..., length=n)`` → ``send_data`` of n bytes →
        ``end_response()`` for a kept-alive request, if :attr:`plain_keep_alive` (else False,
        nothing changed): the caller sends bytes these calls produced before under the same
        inputs (``proxy/respond.py``)."""
        if not (self.their_state is DONE and self.our_state is IDLE and self._request_keep_alive
                and not self._http10 and not self._head_request):     # plain_keep_alive
            return False
        self.they_are_waiting_for_100_continue = False
        self._no_body = False
        self._remaining = 0
        self._chunked = False
        self._response_keep_alive = True
        self.our_state = DONE
        return True

    def request_received(self) -> bool:
        """The request whose head was just returned is complete in the buffer with no body
        before its end (a GET/HEAD with nothing to read): :data:`END` is the next event."""
        events = self._events
        return self.their_state is SEND_BODY and bool(events) and events[0] is END

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """(bytes received but not yet returned as events, the client closed its side).

        After CONNECT: the bytes that followed its head. Otherwise non-empty means another
        request (or part of one) is already buffered.
        """
        if self._stopped:
            return self._trailing, self._eof
        pending = b"\x00" if (self._events or self._in_message) else b""
        return pending, self._eof

    # -- sending ------------------------------------------------------------------------------
    def informational(self, status: int, reason: bytes) -> bytes:
        """A 1xx response (``100 Continue``): no body, does not end the exchange."""
        if self.our_state is not IDLE or not 100 <= status < 200:
            raise LocalProtocolError(f"cannot send {status} now")
        self.they_are_waiting_for_100_continue = False
        return b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason)

    def accept_connect(self, reason: bytes = b"Connection established") -> bytes:
        """The ``200`` that turns a fully received CONNECT into a byte stream (no framing)."""
        if self.their_state is not SWITCHED or self.our_state is not IDLE:
            raise LocalProtocolError("no CONNECT request to accept")
        self.our_state = SWITCHED
        return b"HTTP/1.1 200 %s\r\n\r\n" % reason

    def start_response(self, status: int, reason: bytes, header_block: bytes, *,
                       length: Optional[int], close: bool = False) -> bytes:
        """The serialised head of the final response.

        ``header_block`` holds validated ``Name: value\\r\\n`` lines, without the framing
        fields this method owns (Content-Length, Transfer-Encoding, Connection). ``length`` is
        the body's length (``None``: unknown); for HEAD and 304 it is the length to advertise
        (``None``: none), no body follows. ``close``: the gateway ends the connection after it.
        """
        if self.our_state is not IDLE:
            raise LocalProtocolError(f"a response was already started (state {self.our_state})")
        if not 200 <= status <= 999:
            raise LocalProtocolError(f"bad final status {status}")
        self.they_are_waiting_for_100_continue = False
        keep = self._request_keep_alive and not close
        framing: bytes
        if status == 204 or status == 304 or self._head_request:
            self._no_body = True
            self._remaining = 0
            self._chunked = False
            framing = b"" if (length is None or status == 204) else \
                b"Content-Length: %d\r\n" % length
        else:
            self._no_body = False
            if length is not None:
                if length < 0:
                    raise LocalProtocolError(f"negative Content-Length {length}")
                self._remaining = length
                self._chunked = False
                framing = b"Content-Length: %d\r\n" % length
            elif self._http10:
                self._remaining = None   # close-delimited
                self._chunked = False
                keep = False
                framing = b""
            else:
                self._remaining = None
                self._chunked = True
                framing = b"Transfer-Encoding: chunked\r\n"
        self._response_keep_alive = keep
        if not keep:
            framing += b"Connection: close\r\n"
        self.our_state = SEND_BODY
        return b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (status, reason, header_block, framing)

    def send_data(self, data: bytes) -> list[bytes]:
        """The pieces to write for a body chunk (framing added)."""
        n = len(data)
        self._account(n)
        if self._chunked:
            return [b"%x\r\n" % n, data, b"\r\n"] if n else []
        return [data]

    def frame_region(self, length: int) -> tuple[bytes, bytes]:
        """(prefix, suffix) around ``length`` bytes written by someone else (``sendfile``)."""
        self._account(length)
        if self._chunked and length:
            return b"%x\r\n" % length, b"\r\n"
        return b"", b""

    def _account(self, n: int) -> None:
        if self.our_state is not SEND_BODY:
            raise LocalProtocolError(f"body data outside a response (state {self.our_state})")
        if self._no_body:
            if n:
                raise LocalProtocolError("this response has no body")
            return
        if self._remaining is not None:
            if n > self._remaining:
                self.our_state = ERROR
                raise LocalProtocolError("response body longer than its Content-Length")
            self._remaining -= n

    def end_response(self) -> bytes:
        """The bytes that end the response; raises if the body is shorter than declared."""
        if self.our_state is not SEND_BODY:
            raise LocalProtocolError(f"no response to end (state {self.our_state})")
        if not self._no_body and self._remaining:
            self.our_state = ERROR
            raise LocalProtocolError(f"response body {self._remaining} bytes shorter than its "
                                     "Content-Length")
        self.our_state = DONE if self._response_keep_alive else MUST_CLOSE
        if self._chunked:
            return _CHUNKED_END
        return b""

    def start_next_cycle(self) -> None:
        """Both sides are done with a kept-alive exchange: get ready for the next request."""
        if self.our_state is not DONE or self.their_state is not DONE:
            raise LocalProtocolError(f"not ready for another request (ours {self.our_state}, "
                                     f"theirs {self.their_state})")
        self.our_state = IDLE
        self.their_state = IDLE
        self._head_request = False
