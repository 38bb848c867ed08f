"""One client connection: HTTP/1.1 (:mod:`.http1`), CONNECT (intercept / tunnel), absolute-form.

A connection starts in ``client`` mode (plain HTTP to the proxy port). A ``CONNECT`` that policy
intercepts is answered ``200 Connection established`` and upgraded in place to TLS with a leaf
minted for the CONNECT host; the connection then carries origin-form HTTP/1.1 requests for that
host (``intercepted`` mode) on a fresh HTTP/1.1 state machine. A ``CONNECT`` that policy tunnels
is answered once the upstream socket is open, and the connection becomes a blind byte pipe
(``tunnel`` mode).

Two schedulers, one semantics (``docs/hit-path.md``):

* **callback mode** (no task): the transport's bytes reach :meth:`ClientConnection._on_data`
  in the protocol callback (:class:`~.stream.ClientStream`); complete requests are taken in
  buffer order and *prepared* (:meth:`_prepare`: the checks, the routing, the
  :class:`~gateway.exchange.Exchange`); one whose answer is known without awaiting — a fresh hit
  in memory (``Pipeline.try_hit``), an error the proxy answers itself — is written in the same
  callback with one ``write`` and accounted there. This is how most requests are served.
* **task mode**: the first request that needs awaiting (a miss, a body, CONNECT, a write buffer
  above its high-water mark, a malformed head) is handed to a task *as prepared*, which runs it
  (:meth:`_dispatch`) and then any request already buffered behind it, reading through the
  stream's awaitable :meth:`~.stream.ClientStream.read`; when nothing is buffered any more the
  task ends and the connection is back in callback mode.

Invariants: responses are written in request order (callback mode stops at the first hand-over
and resumes only after the task has answered it and everything behind it that it took); every
request is prepared once and accounted once (access line + metrics), by whichever mode answers
it; ``busy`` is True only while a request is read or answered, so a drain never closes a
connection in the middle of one; one timer per connection bounds the wait for the next bytes
(``header_timeout`` for a first byte or a started head, ``idle_timeout`` between requests).

Requests become :class:`~gateway.exchange.Exchange` objects for the handler; the response
side (head, body forms, framing rules) is :mod:`.respond`, the request side's helpers
:mod:`.request`.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Optional, Union

from ..exchange import (BytesBody, ClientBodyError, EmptyBody, Exchange, Response,
                        error_response)
from ..observability.logging import InfoLine, JsonRun, get_logger, json_value
from . import http1
from .request import AccessRecord, ClientGone, RequestBody, RequestFields
from .respond import CLOSE, KEEP, SWITCHED, Outcome, ResponseWriter
from .routing import CONNECT, Prepared, Reply, RequestRouter
from .shapes import ShapeMemo
from .stream import ClientStream
from .targets import TargetError, parse_authority
from .tls_upgrade import start_tls
from .tunnel import pipe

if TYPE_CHECKING:  # pragma: no cover
    from .server import ProxyServer

log = get_logger("gateway.proxy")
access_log = get_logger("gateway.access")

#: bytes asked of the stream per read: everything it holds (it buffers at most one socket read
#: beyond its high-water mark), so nothing stays behind before a switch to TLS
READ_SIZE = 1024 * 1024
#: request body left unread by the handler that is discarded to keep the connection; beyond it
#: the connection is closed instead
DISCARD_LIMIT = 1024 * 1024
#: the task found nothing more to do: the connection goes back to callback mode
IDLE = Outcome.IDLE


class _HeaderTimeout(Exception):
    pass


class _Handover:
    """What callback mode hands to the task: a request (perhaps prepared, perhaps with its
    answer already known), a parse error, a head timeout, or a write buffer to drain."""

    __slots__ = ("request", "prepared", "response", "error", "timed_out", "drain")

    def __init__(self, request: Optional[http1.RequestHead] = None,
                 prepared: Optional[Prepared] = None, response: Optional[Response] = None, *,
                 error: Optional[http1.RemoteProtocolError] = None,
                 timed_out: bool = False, drain: bool = False) -> None:
        self.request = request
        self.prepared = prepared
        self.response = response
        self.error = error
        self.timed_out = timed_out
        self.drain = drain


class ClientConnection(RequestRouter, ResponseWriter):
    """One client connection (see the module docstring).

    Keep its instance attributes at 29 or fewer: CPython 3.11 shares the keys of instance
    dictionaries only up to a small size, and a 30th attribute gave every idle intercepted
    connection ~1.2 KiB more (``bench/idle_tls.py``: 29.8 → 31.1 KiB; the target is 32).
    ``tests/test_proxy_shapes.py`` counts them."""

    #: the active_connections kind a new connection starts as (the mirror door's: "mirror")
    first_kind = "client"

    def __init__(self, server: "ProxyServer", stream: ClientStream) -> None:
        self.server = server
        self.settings = server.settings.proxy
        self.metrics = server.metrics
        self.stream = stream
        #: the stream is the task mode's reader and writer (the stream API subset)
        self.reader = self.writer = stream
        peer = stream.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if peer else "?"
        #: the client's address without the port (per-address limits)
        self.client_ip: str = peer[0] if peer else "?"
        self.kind: Optional[str] = None
        #: True while a request is being read or answered (drain waits for it)
        self.busy = False
        self.tls_host: Optional[str] = None
        self.tls_port = 0
        self.conn = self._new_http1()
        self._upstream_writer: Optional[asyncio.StreamWriter] = None
        self._idle_timeout = float(self.settings.idle_timeout)
        self._header_timeout = float(self.settings.header_timeout)
        self._loop = asyncio.get_running_loop()
        self._via = f"1.1 {self.settings.via_pseudonym}"
        #: task mode's task; None: callback mode
        self._task: Optional[asyncio.Task] = None
        self._finished = False
        # the one timer per connection (see _arm and _read)
        self._read_deadline = 0.0
        self._read_task: Optional[asyncio.Task] = None
        self._read_timer: Optional[asyncio.TimerHandle] = None
        self._read_timed_out: Optional[asyncio.Task] = None
        #: when the head being received began (callback mode): its deadline does not move
        self._head_started: Optional[float] = None
        #: a Host header already checked against the CONNECT authority on this connection
        self._host_ok: Optional[str] = None
        #: no request read yet on this connection (or since it switched to TLS): the wait for
        #: the first byte is bounded by header_timeout, not idle_timeout (a socket that never
        #: sends must not hold a slot of max_connections for the idle timeout)
        self._fresh = True
        # bound once per connection: the lazy module-level proxy binds anew on every call
        self._access_log = InfoLine(access_log.bind())
        #: intercepted: the request shapes of this connection's authority (``shapes.py``)
        self._shapes: Optional[ShapeMemo] = None

    def _new_http1(self) -> http1.ServerConnection:
        return http1.ServerConnection(max_head_bytes=self.settings.max_header_bytes)

    def _set_kind(self, kind: Optional[str]) -> None:
        if self.kind is not None:
            self.metrics.active_connections.labels(kind=self.kind).dec()
        self.kind = kind
        if kind is not None:
            self.metrics.active_connections.labels(kind=kind).inc()

    # -- lifecycle (called by the server) ----------------------------------------------------
    def start(self) -> None:
        """The connection is accepted and registered: serve it (callback mode first)."""
        self._set_kind(self.first_kind)
        self.stream.on_lost = self._on_lost
        self._enter_callback_mode()

    def close_if_idle(self) -> bool:
        if self.busy:
            return False
        self._close()
        return True

    def abort(self) -> Optional[asyncio.Task]:
        """Abort the sockets; returns the connection's task, cancelled, if one was running
        (the server awaits it)."""
        if self._upstream_writer is not None:
            self._upstream_writer.transport.abort()
        transport = self.stream.transport
        if transport is not None:
            transport.abort()
        task = self._task
        if task is not None:
            task.cancel()
        return task

    def _close(self) -> None:
        self.busy = False
        transport = self.stream.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def _on_lost(self, exc: Optional[BaseException]) -> None:
        if self._task is None:
            self._finish()                       # a running task finishes it when it ends

    def _finish(self) -> None:
        """Once, when the connection is over: metrics, timer, sockets, the server's registry."""
        if self._finished:
            return
        self._finished = True
        self.busy = False
        # the stream's callbacks are bound methods of this object: drop them so the pair (and
        # the TLS objects the stream holds: ~20 KiB of OpenSSL state) is freed by reference
        # counting now, not by a later cyclic garbage collection
        self.stream.on_data = None
        self.stream.on_lost = None
        self._set_kind(None)
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if self._upstream_writer is not None:
            self._upstream_writer.transport.abort()
        self._close()
        self.server.connection_done(self)

    # -- callback mode -----------------------------------------------------------------------
    def _enter_callback_mode(self) -> None:
        stream = self.stream
        self.busy = False
        stream.on_data = self._on_data
        if stream.buffered:
            self.conn.receive_data(stream.take())
        if stream.at_eof:
            self.conn.receive_data(b"")
        self._pump()

    def _on_data(self, data: bytes) -> None:
        """The stream's bytes in callback mode (``b""``: the client closed its side)."""
        try:
            conn = self.conn
            memo = self._shapes
            chunk: Optional[bytes] = None
            if memo is not None and data:
                shape = memo.shapes.get(data)
                if shape is not None and conn.replay(shape.head):
                    # these bytes were parsed and routed before, and the machine is at rest:
                    # replay what that gave
                    self.busy = True
                    self._fresh = False
                    self._head_started = None
                    if self._answer_prepared(shape.head,
                                             shape.prepare(self.client, self._loop.time())):
                        # answered and kept: nothing else was in the chunk, the parser is at
                        # rest — what _pump would find (NEED_DATA, nothing buffered)
                        self.busy = False
                        self._arm()
                    return
                if conn.at_rest:
                    chunk = data                 # fed at rest: its request may become a shape
            conn.receive_data(data)
            self._pump(chunk)
        except Exception:  # noqa: BLE001 - one bad connection must not take the server down
            log.exception("connection_failed", client=self.client)
            self.abort()

    def _pump(self, chunk: Optional[bytes] = None) -> None:
        """Take the parser's events in order while each request is answered at once.
        ``chunk``: the bytes just fed to a parser at rest (the first request may be recorded
        as a shape)."""
        conn = self.conn
        while self._task is None and not self._finished:
            try:
                event = conn.next_event()
            except http1.RemoteProtocolError as exc:
                self.busy = True
                self._start_task(_Handover(error=exc))
                return
            if event is http1.NEED_DATA:
                if conn.trailing_data[0]:            # part of a head is in
                    self.busy = True
                    if self._head_started is None:
                        self._head_started = self._loop.time()
                else:
                    self.busy = False
                self._arm()
                return
            if type(event) is http1.RequestHead:
                self.busy = True
                self._fresh = False
                self._head_started = None
                if not self._answer_now(event, chunk):
                    return
                chunk = None
                continue
            if event is http1.CLOSED:
                self._close()
                return
            self._start_task(_Handover(error=http1.RemoteProtocolError(f"unexpected {event!r}")))
            return

    def _answer_now(self, request: http1.RequestHead, chunk: Optional[bytes] = None) -> bool:
        """Answer ``request`` in this callback if its answer is known without awaiting, else
        hand it to the task. True: answered, and the connection goes on in callback mode.
        ``chunk``: the whole of what was fed at rest before it (a shape candidate)."""
        conn = self.conn
        if request.method == "CONNECT" or not conn.request_received():
            self._start_task(_Handover(request))     # a body to read, or a switch
            return False
        conn.next_event()                            # END: nothing more belongs to it
        prepared = self._prepare(request)
        if chunk is not None and not conn.trailing_data[0] and self._shapes is not None:
            self._shapes.record(chunk, request, prepared)    # the chunk was this request
        return self._answer_prepared(request, prepared)

    def _answer_prepared(self, request: http1.RequestHead, prepared: Prepared) -> bool:
        """:meth:`_answer_now` once ``request`` (complete, bodyless) is prepared."""
        conn = self.conn
        known = self._known_answer(prepared)
        if type(known) is Reply:
            response, extra, close = known.response, known.extra_headers, known.close
        else:
            response, extra, close = known, None, False
        if response is None or self.stream.write_paused or not (
                type(response.body) is BytesBody or type(response.body) is EmptyBody):
            self._start_task(_Handover(request, prepared, response))
            return False
        rec = prepared.rec
        outcome = self._write_now(rec, rec.method, response, extra, close)
        self._account(rec)
        if outcome is not KEEP or conn.our_state is not http1.DONE:
            self._close()
            return False
        conn.start_next_cycle()
        self.busy = False
        if self.stream.write_paused:
            # the client is not reading its answers: the task waits for the buffer to drain
            # before it takes anything more (and the stream stops reading above its mark)
            self._start_task(_Handover(drain=True))
            return False
        return True

    def _arm(self) -> None:
        """Callback mode waits for bytes: bound the wait (the timer fires :meth:`_expired`)."""
        started = self._head_started
        if started is not None:
            deadline = started + self._header_timeout
        else:
            deadline = self._loop.time() + (self._header_timeout if self._fresh
                                             else self._idle_timeout)
        self._read_deadline = deadline
        timer = self._read_timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._read_timer = self._loop.call_at(deadline, self._read_timer_fired)

    def _expired(self) -> None:
        """Callback mode's wait ran out: a started head gets its 408 (from the task), an idle
        connection is closed quietly (a 408 to an idle connection can be taken as the answer
        to a request the client sends at the same moment)."""
        if self._head_started is not None:
            self._start_task(_Handover(timed_out=True))
            return
        if self._fresh:
            self.metrics.client_errors.labels(reason="first_byte_timeout").inc()
        self._close()

    # -- task mode ---------------------------------------------------------------------------
    def _start_task(self, handover: _Handover) -> None:
        self.stream.on_data = None                   # bytes are buffered for the task now
        self._task = self._loop.create_task(self._run_task(handover))

    async def _run_task(self, handover: _Handover) -> None:
        outcome = CLOSE
        try:
            outcome = await self._serve(handover)
        except asyncio.CancelledError:
            pass                                 # the server aborted the connection
        except (OSError, ClientGone, asyncio.IncompleteReadError):
            pass                                 # the client went away (reset, TLS error)
        except Exception:  # noqa: BLE001 - one bad connection must not take the server down
            log.exception("connection_failed", client=self.client)
        finally:
            self._task = None
        transport = self.stream.transport
        if outcome == IDLE and not self._finished and transport is not None \
                and not transport.is_closing():
            self._enter_callback_mode()
        else:
            self._finish()

    def _nothing_pending(self) -> bool:
        return not (self.conn.trailing_data[0] or self.stream.buffered or self.stream.at_eof)

    async def _serve(self, handover: Optional[_Handover]) -> Outcome:
        """Task mode: the handed-over request, then whatever is already buffered behind it.
        Returns :data:`IDLE` (back to callback mode) or CLOSE."""
        while True:
            self.busy = False
            if handover is not None:
                item, handover = handover, None
                self.busy = True
                if item.drain:
                    await self._drain()
                    continue
                if item.timed_out:
                    await self._head_timeout()
                    return CLOSE
                if item.error is not None:
                    await self._protocol_error(item.error)
                    return CLOSE
                assert item.request is not None
                outcome = await self._dispatch(item.request, item.prepared, item.response)
            else:
                if self.server.draining:
                    return CLOSE
                if self._nothing_pending():
                    return IDLE
                try:
                    request = await self._read_head()
                except _HeaderTimeout:
                    await self._head_timeout()
                    return CLOSE
                except http1.RemoteProtocolError as exc:
                    await self._protocol_error(exc)
                    return CLOSE
                if request is None:
                    return CLOSE
                outcome = await self._dispatch(request)
            if outcome == SWITCHED:
                continue
            if outcome == CLOSE or self.server.draining:
                return CLOSE
            if self.conn.our_state is not http1.DONE:
                return CLOSE
            if self.conn.their_state is not http1.DONE and not await self._discard_body():
                return CLOSE
            try:
                self.conn.start_next_cycle()
            except http1.ProtocolError:
                return CLOSE

    async def _head_timeout(self) -> None:
        self.metrics.client_errors.labels(reason="header_timeout").inc()
        await self._head_error(408, "request head not received within proxy.header_timeout")

    async def _protocol_error(self, exc: http1.RemoteProtocolError) -> None:
        if self.conn.trailing_data[1]:
            self.metrics.client_errors.labels(reason="disconnected").inc()
            return
        status = exc.error_status_hint or 400
        if status == 431:
            self.metrics.client_errors.labels(reason="header_too_large").inc()
            msg = (f"request head larger than proxy.max_header_bytes "
                   f"({self.settings.max_header_bytes} bytes)")
        else:
            self.metrics.client_errors.labels(reason="malformed").inc()
            msg = f"malformed HTTP request: {exc}"
        await self._head_error(status, msg)

    # -- reading (task mode) -----------------------------------------------------------------
    async def _read(self, timeout: float) -> bytes:
        """One read, bounded by ``timeout`` (:class:`TimeoutError`).

        Same contract as ``async with asyncio.timeout(timeout)``, at a fraction of the cost:
        ``asyncio.timeout`` schedules and cancels a timer per read (~7 µs here). Instead one
        timer per connection is left running and only the deadline moves; when the timer fires
        early it re-arms itself for the current deadline, when it fires late it cancels the
        reading task (like ``asyncio.timeout``).
        """
        loop = self._loop
        deadline = loop.time() + timeout
        self._read_deadline = deadline
        task = asyncio.current_task()
        self._read_task = task
        timer = self._read_timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._read_timer = loop.call_at(deadline, self._read_timer_fired)
        try:
            return await self.stream.read(READ_SIZE)
        except asyncio.CancelledError:
            if self._read_timed_out is task:
                self._read_timed_out = None
                if task.uncancel() == 0:
                    raise TimeoutError() from None
            raise
        finally:
            self._read_task = None

    def _read_timer_fired(self) -> None:
        self._read_timer = None
        if self._finished:
            return
        deadline = self._read_deadline
        if self._loop.time() < deadline:
            self._read_timer = self._loop.call_at(deadline, self._read_timer_fired)
            return
        if self._task is None:
            self._expired()                      # callback mode
            return
        task = self._read_task
        if task is None:
            return                               # no read waiting: the next read re-arms
        self._read_timed_out = task
        task.cancel()

    async def _read_head(self) -> Optional[http1.RequestHead]:
        conn = self.conn
        deadline: Optional[float] = None
        if conn.trailing_data[0]:                # pipelined request already buffered
            self.busy = True
            deadline = (self._head_started or self._loop.time()) + self._header_timeout
        while True:
            event = conn.next_event()            # raises RemoteProtocolError (400/431/505)
            if event is http1.NEED_DATA:
                if deadline is not None:
                    timeout = deadline - self._loop.time()
                else:
                    timeout = self._header_timeout if self._fresh else self._idle_timeout
                if timeout <= 0:
                    raise _HeaderTimeout()
                try:
                    data = await self._read(timeout)
                except TimeoutError:
                    if deadline is None:
                        # idle keep-alive connection, or one that never said anything: close
                        # quietly
                        if self._fresh:
                            self.metrics.client_errors.labels(reason="first_byte_timeout").inc()
                        return None
                    raise _HeaderTimeout() from None
                except OSError:                  # reset, or a TLS error (ssl.SSLError)
                    return None
                if data and deadline is None:
                    self.busy = True
                    deadline = self._loop.time() + self._header_timeout
                conn.receive_data(data)          # b"": the client closed its side
                continue
            if type(event) is http1.RequestHead:
                self.busy = True
                self._fresh = False
                self._head_started = None
                return event
            if event is http1.CLOSED:
                return None                      # clean close between requests
            raise http1.RemoteProtocolError(f"unexpected {event!r}")

    async def _next_body_event(self) -> "http1.Data | http1._Sentinel":
        while True:
            try:
                event = self.conn.next_event()
            except http1.RemoteProtocolError as exc:
                raise ClientGone(f"request body: {exc}") from None
            if event is not http1.NEED_DATA:
                return event
            try:
                data = await self._read(self._idle_timeout)
            except TimeoutError:
                raise ClientGone("request body: no data within proxy.idle_timeout") from None
            except OSError as exc:
                raise ClientGone(f"request body: {exc}") from None
            self.conn.receive_data(data)

    async def _discard_body(self) -> bool:
        """Read what is left of the request body (bounded); False when the connection must close."""
        discarded = 0
        try:
            while self.conn.their_state is http1.SEND_BODY:
                event = await self._next_body_event()
                if type(event) is http1.Data:
                    discarded += len(event.data)
                    if discarded > DISCARD_LIMIT:
                        return False
        except ClientGone:
            return False
        return self.conn.their_state is http1.DONE

    # -- answers the connection gives itself ---------------------------------------------------
    async def _reply(self, rec: AccessRecord, reply: Reply) -> Outcome:
        return await self._respond(rec, rec.method, reply.response,
                                   extra_headers=reply.extra_headers, close=reply.close)

    async def _error(self, rec: AccessRecord, status: int, message: str, *, reason: str = "",
                     close: bool = False, extra_headers: Optional[dict] = None,
                     client_error: Optional[str] = None) -> Outcome:
        return await self._reply(rec, self._refusal(
            rec, status, message, reason=reason, close=close, extra_headers=extra_headers,
            client_error=client_error))

    async def _head_error(self, status: int, message: str) -> None:
        """Answer a request whose head could not be read (raw, then close), and log it."""
        rec = AccessRecord.of(self.client, "", self._loop.time(), door=self.server.door_name)
        if self.tls_host is not None:
            rec.scheme, rec.host, rec.port = "https", self.tls_host, self.tls_port
            rec.decision = "intercept"
        rec.status, rec.error = status, message
        await self._send_raw_error(status, message)
        self._account(rec)

    # -- one request: prepare (sync), then answer ------------------------------------------------
    def _prepare(self, request: http1.RequestHead) -> Prepared:
        headers = RequestFields(request.headers)
        rec = AccessRecord(self.client, request.method, self._loop.time())
        return Prepared(rec, headers, self._route(request, rec, headers))

    def _known_answer(self, prepared: Prepared) -> Union[Reply, Response, None]:
        """The answer to a complete bodyless request when it is known without awaiting (a
        reply of the connection's own, a fresh hit in memory: the handler's response as it
        is), else None (the task answers)."""
        routed = prepared.routed
        if type(routed) is Reply:
            return routed
        if type(routed) is Exchange and routed.body is None:
            prepared.tried = True
            return self._try_hit(routed)
        return None

    async def _dispatch(self, request: http1.RequestHead, prepared: Optional[Prepared] = None,
                        response: Optional[Response] = None) -> Outcome:
        """Answer one request in the task (``prepared``/``response``: what callback mode
        already did for it); accounted here, once."""
        if prepared is None:
            prepared = self._prepare(request)
        rec, routed = prepared.rec, prepared.routed
        try:
            if type(routed) is Reply:
                return await self._reply(rec, routed)
            return await self._answer_routed(request, prepared, response)
        finally:
            self._account(rec)

    async def _answer_routed(self, request: http1.RequestHead, prepared: Prepared,
                             response: Optional[Response]) -> Outcome:
        """A routed request that is not the connection's own reply: CONNECT, or an exchange
        for the pipeline (the mirror door's connection routes to its door instead)."""
        if prepared.routed is CONNECT:
            return await self._connect(prepared.rec, request.target, prepared.headers)
        return await self._exchange(request, prepared.rec, prepared.routed,  # type: ignore[arg-type]
                                    prepared.headers, response, tried=prepared.tried)

    # -- CONNECT ----------------------------------------------------------------------------
    async def _connect(self, rec: AccessRecord, target: str, headers: RequestFields) -> Outcome:
        rec.path = ""
        try:
            host, port = parse_authority(target)
        except TargetError as exc:
            return await self._error(rec, 400, f"bad CONNECT target {target[:200]!r}: {exc}",
                                     reason=f"Bad CONNECT target: {exc}",
                                     client_error="bad_target", close=True)
        rec.host, rec.port, rec.scheme = host, port, "https"
        refused = self._auth_refusal(rec, headers)
        if refused is not None:
            return await self._reply(rec, refused)
        decision = self.server.policy.decide(host, port)
        rec.decision = decision.action
        if not decision.allowed:
            # nothing useful can follow a refused CONNECT on this connection
            return await self._reply(rec, self._denial(rec, decision, close=True))
        event = await self._next_body_event()
        if event is not http1.END:
            return await self._error(rec, 400, "a CONNECT request must not have a body",
                                     client_error="malformed", close=True)
        if decision.action == "tunnel":
            return await self._tunnel(rec, host, port)
        return await self._intercept(rec, host, port)

    async def _intercept(self, rec: AccessRecord, host: str, port: int) -> Outcome:
        stream = self.stream
        if self.conn.trailing_data[0] or stream.buffered:
            return await self._error(
                rec, 400, "the client sent data before the proxy answered CONNECT",
                client_error="early_data", close=True)
        # Nothing may be read while the leaf is minted (a worker thread, when not cached): the
        # bytes after the 200 belong to the TLS protocol start_tls installs, not to the stream.
        stream.pause_reading()
        try:
            context = await self.server.leaf_issuer.acontext_for(host)
        except Exception as exc:  # noqa: BLE001
            log.exception("leaf_mint_failed", host=host)
            return await self._error(rec, 500, f"cannot mint a certificate for {host}: {exc}",
                                     close=True)
        stream.write(self.conn.accept_connect())
        rec.status = 200
        # No await between writing the 200 and start_tls: the client's ClientHello must reach
        # the TLS protocol. The handshake uses only the local leaf: it never waits for an
        # upstream connection. The stream stays the connection's protocol, on the TLS transport.
        stream.tls = True
        try:
            await start_tls(self._loop, stream.transport, stream, context,
                            ssl_handshake_timeout=self._header_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            self.metrics.tls_handshake_errors.inc()
            rec.error = f"TLS handshake failed: {exc}"
            log.info("tls_handshake_failed", client=self.client, host=host,
                     error=str(exc) or type(exc).__name__,
                     hint="does the client trust the gateway CA? (trivy-gateway ca export)")
            return CLOSE
        self.conn = self._new_http1()
        self._fresh = True
        self.tls_host, self.tls_port = host, port
        self._shapes = self.server.shapes_for(host, port, self.settings)
        rec.established = True
        self._set_kind("intercepted")
        return SWITCHED

    async def _tunnel(self, rec: AccessRecord, host: str, port: int) -> Outcome:
        budget = max(2 * float(self.server.settings.upstream.connect_timeout), 5.0)
        try:
            async with asyncio.timeout(budget):
                up_reader, up_writer = await self.server.open_tunnel(host, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an explained answer
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                message = f"no connection within {budget:g}s"
            if getattr(exc, "reason", None) == "ssrf":
                rec.decision = "deny"
                self.metrics.denied.labels(host=self.metrics.host_label(host), reason="ssrf").inc()
                rec.error = message
                return await self._error(rec, 403, message, reason=message, close=True)
            status = getattr(exc, "status", None)
            if not isinstance(status, int) or not 500 <= status < 600:
                status = 504 if isinstance(exc, TimeoutError) else 502
            rec.error = message
            text = f"cannot open a tunnel to {host}:{port}: {message}"
            return await self._error(rec, status, text, reason=text, close=True)
        self._upstream_writer = up_writer
        self.writer.write(self.conn.accept_connect())
        rec.status = 200
        rec.established = True
        early = self.conn.trailing_data[0]
        if early:
            up_writer.write(early)
        self._set_kind("tunnel")
        try:
            await self._drain()
        except ClientGone:
            up_writer.transport.abort()
            return CLOSE
        up, down, error = await pipe((self.stream, self.stream), (up_reader, up_writer),  # type: ignore[arg-type]
                                     self.metrics, self._idle_timeout, self.settings.chunk_size)
        rec.bytes_in, rec.bytes, rec.error = up + len(early), down, error
        return CLOSE

    def _try_hit(self, exchange: Exchange) -> Optional[Response]:
        """The handler's answer when it is known without awaiting (a small fresh hit), else
        None: then ``handle`` answers (also when ``try_hit`` fails: it only ever saves work)."""
        try_hit = self.server.try_hit
        if try_hit is None:
            return None
        try:
            return try_hit(exchange)
        except Exception:  # noqa: BLE001 - handle() answers the request, and logs what fails
            return None

    async def _exchange(self, request: http1.RequestHead, rec: AccessRecord, exchange: Exchange,
                        headers: RequestFields, response: Optional[Response] = None, *,
                        tried: bool = False) -> Outcome:
        """The pipeline's answer to ``exchange``, written (``response``: already known)."""
        body_iter: Optional[RequestBody] = exchange.body  # type: ignore[assignment]
        host = exchange.host
        if response is None:
            try:
                # a bodyless request the handler can answer without awaiting (a small fresh
                # hit) skips the coroutine chain; None: the same request through handle()
                if body_iter is None and not tried:
                    response = self._try_hit(exchange)
                if response is None:
                    response = await self.server.handler.handle(exchange)
            except asyncio.CancelledError:
                raise
            except (ClientGone, ClientBodyError) as exc:
                rec.error = f"client gone: {exc}"
                self.metrics.client_errors.labels(reason="disconnected").inc()
                return CLOSE
            except Exception as exc:  # noqa: BLE001 - the handler should answer; if it raises, say so
                log.exception("handler_failed", request_id=rec.id, host=host)
                response = error_response(502, f"the gateway failed to handle the request to "
                                               f"{host}: {type(exc).__name__}: {exc}")
        # A request body the handler left unread is discarded after the response when little
        # is left; otherwise the response says Connection: close and the connection lingers.
        close = False
        if body_iter is not None and not body_iter.done:
            length = (headers.content_length or "").strip()
            close = not (length.isdigit() and int(length) - rec.bytes_in <= DISCARD_LIMIT) \
                or body_iter.active
        outcome = await self._respond(rec, rec.method, response, close=close)
        if body_iter is not None:
            await body_iter.aclose()
            if body_iter.active:
                # another task is still pulling the body off this socket: let that read finish
                # (bounded) before anything else reads, and never reuse the connection
                try:
                    async with asyncio.timeout(1):
                        await body_iter.idle.wait()
                except TimeoutError:
                    self.stream.transport.abort()
                    return CLOSE
                close = True
            if close and not self.stream.transport.is_closing():
                await self._linger()
                return CLOSE
        return outcome

    async def _linger(self, seconds: float = 2.0, limit: int = 64 * 1024 * 1024) -> None:
        """Close without resetting a client that is still sending (it must see the response):
        half-close, then read and drop what arrives for a little while."""
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            await self._drain()
            dropped = 0
            async with asyncio.timeout(seconds):
                while dropped < limit:
                    data = await self.reader.read(READ_SIZE)
                    if not data:
                        break
                    dropped += len(data)
        except (TimeoutError, ConnectionError, ClientGone, OSError):
            pass

    # -- accounting ---------------------------------------------------------------------------
    def _remember(self, key: tuple, child) -> None:
        cache = self.server.metric_children
        if len(cache) >= 2048:
            cache.clear()                        # bounded; the next requests fill it again
        cache[key] = child

    def _account(self, rec: AccessRecord) -> None:
        duration = self._loop.time() - rec.started
        metrics = self.metrics
        # keyed by the host as recorded and the host labels' generation: its label is looked
        # up once per key, not per request
        key = (rec.host, rec.decision, rec.status, rec.door, metrics.host_labels_generation)
        children = self.server.metric_children.get(key)
        if children is None:
            host_label = metrics.host_label(rec.host)
            children = (metrics.requests.labels(host=host_label, decision=rec.decision,
                                                status=str(rec.status), door=rec.door),
                        metrics.request_duration.labels(host=host_label))
            self._remember(key, children)
        deferred = metrics.deferred
        deferred.add(children[0])
        if not rec.established:
            deferred.observe(children[1], duration)
        if not self.server.settings.logging.access_log:
            return
        exchange = rec.exchange
        # round(duration, 4) (~0.25 µs) the quick way: the same value for a duration >= 0,
        # except where duration * 10⁴ is within a rounding error of a half (then it may round
        # up where round() rounds down, in the fourth decimal of a log field)
        shown = int(duration * 10000.0 + 0.5) / 10000.0 if duration >= 0 else round(duration, 4)
        self._access_log.fields("request", _access_fields, _access_members, (
            rec, shown, exchange.notes.get("cache") if exchange is not None else None))


def _access_fields(values: tuple) -> dict:
    """The access line's fields, in their order: (record, duration in seconds rounded to 4
    decimals, cache outcome)."""
    rec, duration, cache = values
    fields = {"request_id": rec.id, "client": rec.client, "method": rec.method or None,
              "scheme": rec.scheme or None, "host": rec.host or None, "port": rec.port or None,
              "path": rec.path, "status": rec.status, "bytes": rec.bytes,
              "duration": duration, "decision": rec.decision, "cache": cache,
              "door": rec.door}
    if rec.bytes_in:
        fields["bytes_in"] = rec.bytes_in
    if rec.error:
        fields["error"] = rec.error
    return fields


#: the runs of :func:`_access_fields` that repeat from one request to the next (a hit of the
#: same URL, size and outcome), in their order
_ACCESS_TARGET = JsonRun(("method", "scheme", "host", "port", "path", "status", "bytes"))
_ACCESS_OUTCOME = JsonRun(("decision", "cache", "door"))
#: a client address → its JSON text (a connection's client is on every line it logs)
_client_texts: dict[str, str] = {}


def _access_members(values: tuple) -> str:
    """:func:`_access_fields` as JSON members text (``InfoLine.fields``): the same text, the
    repeating runs remembered (one lookup each: this runs for every request)."""
    rec, duration, cache = values
    client = _client_texts.get(rec.client)
    if client is None:
        if len(_client_texts) >= 4096:
            _client_texts.clear()
        client = _client_texts[rec.client] = json_value(rec.client)
    key = (rec.method or None, rec.scheme or None, rec.host or None, rec.port or None, rec.path,
           rec.status, rec.bytes)
    target = _ACCESS_TARGET.texts.get(key) or _ACCESS_TARGET.text(key)
    key = (rec.decision, cache, rec.door)
    outcome = _ACCESS_OUTCOME.texts.get(key) or _ACCESS_OUTCOME.text(key)
    # repr() is orjson's text for a float of 4 decimals from 0.0001 up to 1e15 (and 0.0)
    shown = (repr(duration) if 0.0001 <= duration < 1e15 or duration == 0.0
             else json_value(duration))
    text = (f'"request_id":{json_value(rec.id)},"client":{client},{target},'
            f'"duration":{shown},{outcome}')
    if rec.bytes_in:
        text += f',"bytes_in":{json_value(rec.bytes_in)}'
    if rec.error:
        text += f',"error":{json_value(rec.error)}'
    return text
