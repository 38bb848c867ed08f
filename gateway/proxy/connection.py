"""One client connection: HTTP/1.1 (:mod:`.http1`), CONNECT (intercept / tunnel), absolute-form.

A connection starts in ``client`` mode (plain HTTP to the proxy port). A ``CONNECT`` that policy
intercepts is answered ``200 Connection established`` and upgraded in place to TLS with a leaf
minted for the CONNECT host; the connection then carries origin-form HTTP/1.1 requests for that
host (``intercepted`` mode) on a fresh HTTP/1.1 state machine. A ``CONNECT`` that policy tunnels
is answered once the upstream socket is open, and the connection becomes a blind byte pipe
(``tunnel`` mode).

Requests become :class:`~gateway.exchange.Exchange` objects for the handler; the response
side (head, body forms, framing rules) is :mod:`.respond`, the request side's helpers
:mod:`.request`.
"""
from __future__ import annotations

import asyncio
import math
import ssl
from typing import TYPE_CHECKING, Optional

from multidict import CIMultiDict

from ..exchange import ClientBodyError, EmptyBody, Exchange, Response, error_response
from ..observability.logging import InfoLine, get_logger
from . import http1
from .request import AccessRecord, ClientGone, RequestBody, RequestFields
from .respond import CLOSE, SWITCHED, ResponseWriter
from .targets import TargetError, authority, is_absolute, parse_absolute, parse_authority
from .tls_upgrade import TLSStreamReaderProtocol, start_tls
from .tunnel import pipe

if TYPE_CHECKING:  # pragma: no cover
    from .server import ProxyServer

log = get_logger("gateway.proxy")
access_log = get_logger("gateway.access")

#: bytes asked of the socket per read; larger than anything a StreamReader buffers (2 × 64 KiB
#: limit + one 256 KiB recv), so a read always empties it (needed before switching to TLS)
READ_SIZE = 1024 * 1024
#: request body left unread by the handler that is discarded to keep the connection; beyond it
#: the connection is closed instead
DISCARD_LIMIT = 1024 * 1024


class _HeaderTimeout(Exception):
    pass


class ClientConnection(ResponseWriter):
    #: the active_connections kind a new connection starts as (the mirror door's: "mirror")
    first_kind = "client"

    def __init__(self, server: "ProxyServer", reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.settings = server.settings.proxy
        self.metrics = server.metrics
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
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
        # the read timeout (see _read)
        self._read_deadline = 0.0
        self._read_task: Optional[asyncio.Task] = None
        self._read_timer: Optional[asyncio.TimerHandle] = None
        self._read_timed_out: Optional[asyncio.Task] = None
        #: a Host header already checked against the CONNECT authority on this connection
        self._host_ok: Optional[str] = None
        #: no request read yet on this connection (or since it switched to TLS): the wait for
        #: the first byte is bounded by header_timeout, not idle_timeout (a socket that never
        #: sends must not hold a slot of max_connections for the idle timeout)
        self._fresh = True
        # bound once per connection: the lazy module-level proxy binds anew on every call
        self._access_log = InfoLine(access_log.bind())

    def _new_http1(self) -> http1.ServerConnection:
        return http1.ServerConnection(max_head_bytes=self.settings.max_header_bytes)

    def _set_kind(self, kind: Optional[str]) -> None:
        if self.kind is not None:
            self.metrics.active_connections.labels(kind=self.kind).dec()
        self.kind = kind
        if kind is not None:
            self.metrics.active_connections.labels(kind=kind).inc()

    # -- lifecycle (called by the server) ----------------------------------------------------
    def close_if_idle(self) -> bool:
        if self.busy:
            return False
        self.writer.transport.close()
        return True

    def abort(self) -> None:
        if self._upstream_writer is not None:
            self._upstream_writer.transport.abort()
        self.writer.transport.abort()

    async def run(self) -> None:
        self._set_kind(self.first_kind)
        try:
            await self._serve()
        except (OSError, ClientGone, asyncio.IncompleteReadError):
            pass                                 # the client went away (reset, TLS error)
        except Exception:  # noqa: BLE001 - one bad connection must not take the server down
            log.exception("connection_failed", client=self.client)
        finally:
            self.busy = False
            self._set_kind(None)
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None
            if self._upstream_writer is not None:
                self._upstream_writer.transport.abort()
            transport = self.writer.transport
            if not transport.is_closing():
                transport.close()

    # -- reading ------------------------------------------------------------------------------
    async def _read(self, timeout: float) -> bytes:
        """One read, bounded by ``timeout`` (:class:`TimeoutError`).

        Same contract as ``async with asyncio.timeout(timeout)``, at a fraction of the cost on
        the path every request takes: ``asyncio.timeout`` schedules and cancels a timer per
        read (~7 µs here). Instead one timer per connection is left running and only the
        deadline moves; when the timer fires early it re-arms itself for the current
        deadline, when it fires late it cancels the reading task (like ``asyncio.timeout``).
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
            return await self.reader.read(READ_SIZE)
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
        task = self._read_task
        if task is None:
            return                               # no read waiting: the next read re-arms
        deadline = self._read_deadline
        if self._loop.time() < deadline:
            self._read_timer = self._loop.call_at(deadline, self._read_timer_fired)
            return
        self._read_timed_out = task
        task.cancel()

    async def _read_head(self) -> Optional[http1.RequestHead]:
        conn = self.conn
        deadline: Optional[float] = None
        if conn.trailing_data[0]:                # pipelined request already buffered
            self.busy = True
            deadline = self._loop.time() + self._header_timeout
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
                        # quietly (a 408 to an idle connection can be taken as the answer to a
                        # request the client sends at the same moment)
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

    # -- writing ------------------------------------------------------------------------------
    async def _error(self, rec: AccessRecord, status: int, message: str, *, reason: str = "",
                     close: bool = False, extra_headers: Optional[dict] = None,
                     client_error: Optional[str] = None) -> str:
        if client_error:
            # a client that sends what a proxy cannot use is misconfigured: do not keep it
            self.metrics.client_errors.labels(reason=client_error).inc()
            rec.error = message
            close = True
        response = error_response(status, message, reason=reason)
        return await self._respond(rec, rec.method, response, extra_headers=extra_headers,
                                   close=close)

    # -- the request loop --------------------------------------------------------------------
    async def _serve(self) -> None:
        while True:
            self.busy = False
            if self.server.draining:
                return
            try:
                request = await self._read_head()
            except _HeaderTimeout:
                self.metrics.client_errors.labels(reason="header_timeout").inc()
                await self._head_error(408, "request head not received within "
                                            "proxy.header_timeout")
                return
            except http1.RemoteProtocolError as exc:
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
                return
            if request is None:
                return
            outcome = await self._dispatch(request)
            if outcome == SWITCHED:
                continue
            if outcome == CLOSE or self.server.draining:
                return
            if self.conn.our_state is not http1.DONE:
                return
            if self.conn.their_state is not http1.DONE and not await self._discard_body():
                return
            try:
                self.conn.start_next_cycle()
            except http1.ProtocolError:
                return

    async def _head_error(self, status: int, message: str) -> None:
        """Answer a request whose head could not be read (raw, then close), and log it."""
        rec = AccessRecord(client=self.client, method="", started=self._loop.time(),
                           door=self.server.door_name)
        if self.tls_host is not None:
            rec.scheme, rec.host, rec.port = "https", self.tls_host, self.tls_port
            rec.decision = "intercept"
        rec.status, rec.error = status, message
        await self._send_raw_error(status, message)
        self._account(rec)

    async def _dispatch(self, request: http1.RequestHead) -> str:
        method = request.method
        target = request.target
        headers = RequestFields(request.headers)
        rec = AccessRecord(client=self.client, method=method, started=self._loop.time())
        try:
            host_problem = self._host_field_problem(request, headers)
            if host_problem:
                rec.path = target.split("?", 1)[0][:200]
                return await self._error(rec, 400, host_problem, reason=f"Bad Request: "
                                         f"{host_problem}", client_error="bad_host")
            if self.tls_host is not None:
                return await self._intercepted_request(request, rec, target, headers)
            if method == "CONNECT":
                return await self._connect(rec, target, headers)
            if is_absolute(target):
                return await self._absolute(request, rec, target, headers)
            rec.path = target.split("?", 1)[0][:200]
            return await self._error(
                rec, 400,
                f"trivy-gateway is a forward proxy, not a web server: got {method} {target[:200]}. "
                "Point clients at it with HTTPS_PROXY=http://<gateway>:<port> (CONNECT) or "
                "HTTP_PROXY (absolute-form requests such as GET http://host/path).",
                reason="Bad Request: this is a proxy, send CONNECT or an absolute URL",
                client_error="not_proxy_request")
        finally:
            self._account(rec)

    def _host_field_problem(self, request: http1.RequestHead, headers: RequestFields) -> str:
        """RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host field, any request at most
        one, and its value is a valid authority (or empty); '' when all is well."""
        count = headers.host_count
        if count > 1:
            return f"{count} Host header fields (exactly one is allowed)"
        if count == 0:
            return "missing Host header field" if request.http_version == "1.1" else ""
        value = headers.host
        # an empty value is allowed (§3.2); the Host this connection already accepted (the same
        # on every request of a kept-alive connection) was parsed then
        if value and value != self._host_ok:
            try:
                parse_authority(value, 80)
            except TargetError as exc:
                return f"bad Host header {value[:100]!r}: {exc}"
        return ""

    # -- CONNECT ----------------------------------------------------------------------------
    async def _check_auth(self, rec: AccessRecord, headers: RequestFields) -> Optional[str]:
        """None when the request may go on; otherwise the outcome of the 407 or 429 sent.

        Wrong credentials count against the client's address (:class:`~.auth.FailureLimiter`);
        a locked-out address is answered 429 without its credentials being looked at.
        """
        auth = self.server.auth
        if not auth.enabled:
            return None
        limiter = auth.failures
        locked = limiter.locked_for(self.client_ip)
        if locked is not None:
            self.metrics.client_errors.labels(reason="auth_locked_out").inc()
            message = (f"too many failed proxy authentications from {self.client_ip}; "
                       f"retry in {math.ceil(locked)} s (proxy.auth.max_failures)")
            rec.error = message
            return await self._error(rec, 429, message, reason="Too Many Requests",
                                     extra_headers={"Retry-After": str(math.ceil(locked))},
                                     close=True)
        if auth.check(headers.proxy_auth):
            if headers.proxy_auth:
                limiter.succeeded(self.client_ip)
            return None
        self.metrics.proxy_auth_failures.inc()
        if headers.proxy_auth:                   # a wrong guess, not just the challenge leg
            limiter.failed(self.client_ip)
        rec.error = "proxy authentication required"
        return await self._error(
            rec, 407, "proxy authentication required: put the credentials in the proxy URL, "
            "e.g. HTTPS_PROXY=http://user:password@gateway:3128",
            extra_headers={"Proxy-Authenticate": auth.challenge})

    async def _deny(self, rec: AccessRecord, decision, *, close: bool = False) -> str:
        self.metrics.denied.labels(host=self.metrics.host_label(decision.host),
                                   reason=decision.reason_code).inc()
        rec.error = decision.reason
        if decision.reason_code == "rule":
            message = decision.reason
        else:
            message = (f"{decision.reason}\nTo allow it, add a rule to policy.rules in the gateway "
                       f"configuration, e.g.  - {{host: {decision.host}, action: intercept}}")
        return await self._error(rec, 403, message, reason=decision.reason, close=close)

    async def _connect(self, rec: AccessRecord, target: str, headers: RequestFields) -> str:
        rec.path = ""
        try:
            host, port = parse_authority(target)
        except TargetError as exc:
            return await self._error(rec, 400, f"bad CONNECT target {target[:200]!r}: {exc}",
                                     reason=f"Bad CONNECT target: {exc}",
                                     client_error="bad_target", close=True)
        rec.host, rec.port, rec.scheme = host, port, "https"
        refused = await self._check_auth(rec, headers)
        if refused is not None:
            return refused
        decision = self.server.policy.decide(host, port)
        rec.decision = decision.action
        if not decision.allowed:
            # nothing useful can follow a refused CONNECT on this connection
            return await self._deny(rec, decision, close=True)
        event = await self._next_body_event()
        if event is not http1.END:
            return await self._error(rec, 400, "a CONNECT request must not have a body",
                                     client_error="malformed", close=True)
        if decision.action == "tunnel":
            return await self._tunnel(rec, host, port)
        return await self._intercept(rec, host, port)

    async def _intercept(self, rec: AccessRecord, host: str, port: int) -> str:
        if self.conn.trailing_data[0]:
            return await self._error(
                rec, 400, "the client sent data before the proxy answered CONNECT",
                client_error="early_data", close=True)
        # Nothing may be read while the leaf is minted (a worker thread, when not cached): the
        # bytes after the 200 belong to the TLS protocol start_tls installs, not to our reader.
        self.writer.transport.pause_reading()
        try:
            context = await self.server.leaf_issuer.acontext_for(host)
        except Exception as exc:  # noqa: BLE001
            log.exception("leaf_mint_failed", host=host)
            return await self._error(rec, 500, f"cannot mint a certificate for {host}: {exc}",
                                     close=True)
        self.writer.write(self.conn.accept_connect())
        rec.status = 200
        # No await between writing the 200 and start_tls: the client's ClientHello must reach
        # the TLS protocol, not the plain reader. The handshake uses only the local leaf: it
        # never waits for an upstream connection.
        reader = asyncio.StreamReader(limit=2 ** 16, loop=self._loop)
        protocol = TLSStreamReaderProtocol(reader, loop=self._loop)
        try:
            transport = await start_tls(self._loop, self.writer.transport, protocol, context,
                                        ssl_handshake_timeout=self._header_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            self.metrics.tls_handshake_errors.inc()
            rec.error = f"TLS handshake failed: {exc}"
            log.info("tls_handshake_failed", client=self.client, host=host,
                     error=str(exc) or type(exc).__name__,
                     hint="does the client trust the gateway CA? (trivy-gateway ca export)")
            return CLOSE
        self.reader = reader
        self.writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
        self.conn = self._new_http1()
        self._fresh = True
        self.tls_host, self.tls_port = host, port
        rec.established = True
        self._set_kind("intercepted")
        return SWITCHED

    async def _tunnel(self, rec: AccessRecord, host: str, port: int) -> str:
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
        up, down, error = await pipe((self.reader, self.writer), (up_reader, up_writer),
                                     self.metrics, self._idle_timeout, self.settings.chunk_size)
        rec.bytes_in, rec.bytes, rec.error = up + len(early), down, error
        return CLOSE

    # -- HTTP requests ----------------------------------------------------------------------
    async def _absolute(self, request: http1.RequestHead, rec: AccessRecord, target: str,
                        headers: RequestFields) -> str:
        try:
            scheme, host, port, origin = parse_absolute(target)
        except TargetError as exc:
            return await self._error(rec, 400, f"bad request target {target[:200]!r}: {exc}",
                                     reason=f"Bad request target: {exc}", client_error="bad_target")
        rec.scheme, rec.host, rec.port, rec.path = scheme, host, port, origin.split("?", 1)[0]
        if scheme != "http":
            return await self._error(
                rec, 400, f"{scheme}:// URLs must be requested through CONNECT: set HTTPS_PROXY "
                "(not HTTP_PROXY) to the gateway, or request http:// URLs",
                reason="Bad Request: use CONNECT for https URLs", client_error="bad_target")
        refused = await self._check_auth(rec, headers)
        if refused is not None:
            return refused
        decision = self.server.policy.decide(host, port, plain_http=True)
        rec.decision = decision.action
        if not decision.allowed:
            return await self._deny(rec, decision)
        if decision.action != "intercept":
            rec.decision = "deny"
            self.metrics.denied.labels(host=self.metrics.host_label(host), reason="rule").inc()
            message = (f"{host} is allowed as a blind tunnel only ({decision.rule_key}); "
                       "plain-HTTP requests to it are not relayed: use https (CONNECT)")
            rec.error = message
            return await self._error(rec, 403, message, reason=message)
        return await self._exchange(request, rec, "http", host, port, origin, headers)

    async def _intercepted_request(self, request: http1.RequestHead, rec: AccessRecord, target: str,
                                   headers: RequestFields) -> str:
        host, port = self.tls_host, self.tls_port
        rec.scheme, rec.host, rec.port, rec.decision = "https", host, port, "intercept"
        if rec.method == "CONNECT":
            return await self._error(rec, 400, "CONNECT inside an intercepted connection is not "
                                     "supported", client_error="malformed", close=True)
        origin = target
        absolute = is_absolute(target)
        if absolute:
            try:
                scheme, t_host, t_port, origin = parse_absolute(target)
            except TargetError as exc:
                return await self._error(rec, 400, f"bad request target: {exc}",
                                         client_error="bad_target")
            if (scheme, t_host, t_port) != ("https", host, port):
                return await self._misdirected(rec, target)
        elif target == "*" and rec.method == "OPTIONS":
            # asks about the server, not a resource: there is no URL to forward (it would
            # become https://host*), and the gateway is the server this connection talks to
            rec.path = "*"
            return await self._respond(rec, rec.method, Response(200, CIMultiDict(
                {"Allow": "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"}), EmptyBody()))
        elif not target.startswith("/"):
            return await self._error(rec, 400, f"bad request target {target[:200]!r}",
                                     client_error="bad_target")
        rec.path = origin.split("?", 1)[0]
        host_header = headers.host
        if host_header is not None and host_header != self._host_ok and not absolute:
            try:
                h_host, h_port = parse_authority(host_header, 443)
            except TargetError:
                return await self._error(rec, 400, f"bad Host header {host_header[:200]!r}",
                                         client_error="bad_target")
            if (h_host, h_port) != (host, port):
                return await self._misdirected(rec, host_header)
            self._host_ok = host_header          # the same Host on every request: check once
        return await self._exchange(request, rec, "https", host, port, origin, headers)

    async def _misdirected(self, rec: AccessRecord, what: str) -> str:
        here = authority(self.tls_host or "", self.tls_port, "https")
        return await self._error(
            rec, 421, f"this connection was opened with CONNECT {here}; it cannot carry requests "
            f"for {what[:200]}", reason=f"Misdirected Request: connection is for {here}",
            client_error="misdirected")

    async def _exchange(self, request: http1.RequestHead, rec: AccessRecord, scheme: str, host: str,
                        port: int, origin: str, headers: RequestFields) -> str:
        # end-to-end headers, then Host and Via; RFC 9112 §3.2.2: the target's authority wins
        # over the client's Host
        ex_headers = headers.forward
        ex_headers["Host"] = authority(host, port, scheme)
        via = ", ".join(headers.vias)
        version = request.http_version
        ex_headers["Via"] = (via + ", " if via else "") + f"{version} {self.settings.via_pseudonym}"
        chunked = headers.chunked
        clen = headers.content_length
        if chunked and clen is not None:
            # RFC 9112 §6.3: both framings at once is a request-smuggling pattern (llhttp
            # already refuses it; kept as a second line)
            return await self._error(rec, 400, "Content-Length together with Transfer-Encoding "
                                     "is not accepted", client_error="malformed")
        has_body = chunked or (clen is not None and clen.strip() not in ("", "0"))
        body_iter = RequestBody(self, rec) if has_body else None
        exchange = Exchange(method=rec.method, scheme=scheme, host=host, port=port, target=origin,
                            headers=ex_headers, body=body_iter, client=self.client, id=rec.id)
        exchange.notes["decision"] = rec.decision
        rec.exchange = exchange
        try:
            # a bodyless request the handler can answer without awaiting (a small fresh hit)
            # skips the coroutine chain; None: the same request through handle()
            try_hit = self.server.try_hit
            response = try_hit(exchange) if try_hit is not None and body_iter is None else None
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
            length = (clen or "").strip()
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
                    self.writer.transport.abort()
                    return CLOSE
                close = True
            if close and not self.writer.transport.is_closing():
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
        if len(cache) < 2048:
            cache[key] = child

    def _account(self, rec: AccessRecord) -> None:
        duration = self._loop.time() - rec.started
        host_label = self.metrics.host_label(rec.host)
        key = (host_label, rec.decision, rec.status, rec.door)
        children = self.server.metric_children.get(key)
        if children is None:
            children = (self.metrics.requests.labels(host=host_label, decision=rec.decision,
                                                     status=str(rec.status), door=rec.door),
                        self.metrics.request_duration.labels(host=host_label))
            self._remember(key, children)
        children[0].inc()
        if not rec.established:
            children[1].observe(duration)
        if not self.server.settings.logging.access_log:
            return
        notes = rec.exchange.notes if rec.exchange is not None else {}
        fields = dict(request_id=rec.id, client=rec.client, method=rec.method or None,
                      scheme=rec.scheme or None, host=rec.host or None, port=rec.port or None,
                      path=rec.path, status=rec.status, bytes=rec.bytes, duration=round(duration, 4),
                      decision=rec.decision, cache=notes.get("cache"), door=rec.door)
        if rec.bytes_in:
            fields["bytes_in"] = rec.bytes_in
        if rec.error:
            fields["error"] = rec.error
        self._access_log("request", fields)
