"""Writing a response on a client connection: the head (pre-rendered for cache hits), then the
body in one of its forms — bytes in memory with the head in one write, a file region by
``loop.sendfile`` on plain connections, or a stream with back-pressure — framed by the
connection's :class:`~.http1.ServerConnection`, which never lets a short or long body look
complete.

Framing rules applied to responses (the state machine enforces the byte counts):

* ``Content-Length`` comes from ``Body.length`` when known; otherwise the body is chunked
  (HTTP/1.1 clients) or close-delimited (HTTP/1.0 clients).
* HEAD responses never carry a body; their ``Content-Length`` is the handler's header if it set
  one, else ``Body.length``. 1xx/204/304 responses never carry a body either.
* A body that fails or ends short mid-way aborts the client connection: a truncated body is never
  presented as complete.
* A :class:`~gateway.exchange.FileBody` on a plain (non-TLS) connection is sent with
  ``loop.sendfile`` (zero-copy); the state machine accounts for the region up front
  (:meth:`~.http1.ServerConnection.frame_region`), so its Content-Length bookkeeping stays exact.
"""
from __future__ import annotations

import asyncio
import http
import os
from enum import StrEnum
from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

from ..exchange import (HOP_BY_HOP, BytesBody, EmptyBody, FileBody, InvalidHeader, Response,
                        header_line)
from ..observability.logging import get_logger
from . import http1
from .request import AccessRecord, ClientGone

if TYPE_CHECKING:  # pragma: no cover
    from ..observability.metrics import Metrics
    from .stream import ClientStream
    from .server import ProxyServer

log = get_logger("gateway.proxy")

#: loop.sendfile is called per slice of this size, each under the idle timeout
SENDFILE_SLICE = 8 * 1024 * 1024
#: a body chunk up to this size is joined with the response head into one write (one TLS record,
#: one send); larger chunks are not copied for that
COALESCE_LIMIT = 64 * 1024

class Outcome(StrEnum):
    """What became of a connection after an answer (or of the task, for IDLE)."""

    KEEP = "keep"            # kept alive: the next request may come
    CLOSE = "close"          # to be closed
    SWITCHED = "switched"    # CONNECT accepted: the connection now carries TLS or a tunnel
    IDLE = "idle"            # the task has nothing more to do: back to callback mode


KEEP, CLOSE, SWITCHED = Outcome.KEEP, Outcome.CLOSE, Outcome.SWITCHED


class BodyFailed(Exception):
    """The response body could not be produced to the end (upstream cut, cache read error)."""


def _header_line(name: str, value: str) -> bytes:
    try:
        return header_line(name, value)
    except InvalidHeader as exc:
        raise http1.LocalProtocolError(f"invalid response header: {exc}") from None


def reason_phrase(text: str, limit: int = 400) -> bytes:
    """A reason phrase: one line of printable characters (RFC 9112 §4), bounded."""
    cleaned = "".join(ch if 32 <= ord(ch) < 127 or 160 <= ord(ch) < 256 else " " for ch in text)
    cleaned = " ".join(cleaned.split())
    if len(cleaned) > limit:
        cleaned = cleaned[:limit - 3] + "..."
    return cleaned.encode("latin-1")


_reasons: dict[tuple[str, int], bytes] = {}


def _reason(text: str, status: int) -> bytes:
    """``reason_phrase(text or the status's standard phrase)``, memoised (bounded)."""
    text = text or ""
    key = (text, status)
    phrase = _reasons.get(key)
    if phrase is None:
        phrase = reason_phrase(text or _default_reason(status))
        if len(_reasons) < 512 and len(text) <= 200:
            _reasons[key] = phrase
    return phrase


def _default_reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _bodiless(method: str, status: int) -> bool:
    """HEAD answers and 1xx/204/304 never carry a body (RFC 9110 §6.4.1)."""
    return method == "HEAD" or status < 200 or status == 204 or status == 304


@runtime_checkable
class ResponseWriterHost(Protocol):
    """What :class:`ResponseWriter` needs from the class it is mixed into (the connection):
    checked by the type checker where the mixin is used, and by a test against
    :class:`~.connection.ClientConnection`."""

    writer: "ClientStream"
    conn: http1.ServerConnection
    server: "ProxyServer"
    metrics: "Metrics"
    tls_host: Optional[str]
    _loop: asyncio.AbstractEventLoop
    _via: str
    _idle_timeout: float

    def _remember(self, key: tuple, child: object) -> None:
        """Keep a metric child for ``key`` (bounded cache on the server)."""


class ResponseWriter(ResponseWriterHost):
    """The response half of :class:`~.connection.ClientConnection`: a mixin that declares
    (by subclassing it) the :class:`ResponseWriterHost` its host class must provide."""

    async def _drain(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing() and not transport.get_write_buffer_size():
            return                               # nothing buffered: drain() would not wait
        try:
            async with asyncio.timeout(self._idle_timeout):
                await self.writer.drain()
        except OSError as exc:                   # includes TimeoutError and ssl.SSLError
            raise ClientGone(str(exc) or "client stopped reading") from None

    @staticmethod
    def _raw_error(status: int, message: str) -> bytes:
        """An error answer outside the state machine's normal flow (after a protocol error),
        with ``Connection: close``."""
        body = (message.rstrip("\n") + "\n").encode("utf-8")
        return (f"HTTP/1.1 {status} ".encode() + reason_phrase(message or _default_reason(status))
                + b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)

    async def _send_raw_error(self, status: int, message: str) -> None:
        """Write :meth:`_raw_error` and wait for it to leave; then the caller closes."""
        try:
            self.writer.write(self._raw_error(status, message))
            await self._drain()
        except ClientGone:
            pass

    def _response_head(self, method: str, response: Response, extra: Optional[dict],
                       close: bool) -> bytes:
        """The serialised response head: the handler's end-to-end headers (hop-by-hop ones and
        those named in its ``Connection`` dropped), each validated (memoised per name and
        value), ``Via`` appended, then the framing the state machine decides from the body's
        length (HEAD and 304 advertise the handler's ``Content-Length`` when it set one)."""
        status = response.status
        if response.head is not None:
            # pre-rendered end-to-end fields (cache hits): only Via and the framing to add
            length = response.body.length
            if method == "HEAD" and not length:
                length = None
            block = response.head + _header_line("Via", self._via)
            if extra:
                block += b"".join(_header_line(k, v) for k, v in extra.items())
            return self.conn.start_response(status, _reason(response.reason, status), block,
                                            length=length, close=close or self.server.draining)
        src = response.headers
        named = None
        if "connection" in src:
            named = {t.strip().lower() for v in src.getall("connection") for t in v.split(",")}
        lines: list[bytes] = []
        vias: list[str] = []
        declared: Optional[str] = None
        for k, v in src.items():
            lk = k.lower()
            if lk in HOP_BY_HOP or (named and lk in named):
                continue
            if lk == "content-length":
                declared = v
                continue
            if lk == "via":
                vias.append(v)
                continue
            lines.append(_header_line(k, v))
        via = ", ".join(vias)
        lines.append(_header_line("Via", (via + ", " if via else "") + self._via))
        if extra:
            for k, v in extra.items():
                lines.append(_header_line(k, v))
        length = response.body.length
        if status == 304 or method == "HEAD":
            if declared is not None:
                declared = declared.strip()
                if not declared.isdigit():
                    raise http1.LocalProtocolError(f"bad Content-Length {declared[:40]!r}")
                length = int(declared)
            elif status == 304 or not length:
                length = None
        return self.conn.start_response(status, _reason(response.reason, status),
                                        b"".join(lines), length=length,
                                        close=close or self.server.draining)

    def _write_now(self, rec: AccessRecord, method: str, response: Response,
                   extra_headers: Optional[dict] = None, close: bool = False) -> Outcome:
        """Write a response whose body is in memory (:class:`BytesBody` or :class:`EmptyBody`,
        which hold nothing to release): head, body and end-of-message in ONE write (one TLS
        record, one send), without awaiting — callback mode answers with it in the protocol
        callback, :meth:`_respond` then drains. Returns KEEP or CLOSE."""
        rec.status = response.status
        conn = self.conn
        wire = response.wire
        if (wire is not None and method == "GET" and extra_headers is None and not close
                and wire[0] == self._via and not self.server.draining
                and conn.replay_response()):
            # the same answer object to a request with the same framing inputs (a hit's answer
            # is shared for its Age second; replay_response checks the connection's): the
            # same bytes, the same transitions
            self.writer.write(wire[1])
            n = wire[2]
            rec.bytes += n
            if response.source in ("cache", "upstream"):
                self._served_bytes(response.source, n)
            return KEEP
        memo = (method == "GET" and extra_headers is None and not close
                and conn.plain_keep_alive and not self.server.draining)
        try:
            head_bytes = self._response_head(method, response, extra_headers, close)
        except http1.LocalProtocolError as exc:
            self.writer.write(self._invalid_head(rec, exc))
            return CLOSE
        if _bodiless(method, response.status):
            self.writer.write(head_bytes + conn.end_response())
        else:
            data = response.body.data if type(response.body) is BytesBody else b""  # type: ignore[attr-defined]
            if data:
                pieces = conn.send_data(data)
                end = conn.end_response()
                out = b"".join((head_bytes, *pieces, end))
                self.writer.write(out)
                rec.bytes += len(data)
                if response.source in ("cache", "upstream"):
                    self._served_bytes(response.source, len(data))
                # (a body in memory is framed by its length: the bytes are the whole answer)
                if memo and response.head is not None and conn.our_state is http1.DONE:
                    response.wire = (self._via, out, len(data))
            else:
                self.writer.write(head_bytes + conn.end_response())
        if conn.our_state is not http1.DONE or close:
            return CLOSE
        return KEEP

    def _invalid_head(self, rec: AccessRecord, exc: http1.LocalProtocolError) -> bytes:
        """Record a response head the gateway could not produce; the 502 to send instead."""
        rec.error = f"invalid response head: {exc}"
        rec.status = 502
        log.warning("invalid_response", request_id=rec.id, host=rec.host, error=str(exc))
        return self._raw_error(502, f"the gateway produced an invalid response: {exc}")

    def _client_gone(self, rec: AccessRecord, exc: ClientGone) -> Outcome:
        rec.error = rec.error or f"client gone: {exc}"
        self.metrics.client_errors.labels(reason="disconnected").inc()
        self.writer.transport.abort()
        return CLOSE

    def _served_bytes(self, source: str, n: int) -> None:
        key = ("served_bytes", source)
        child = self.server.metric_children.get(key)
        if child is None:
            child = self.metrics.served_bytes.labels(source=source)
            self._remember(key, child)
        self.metrics.deferred.add(child, n)

    async def _respond(self, rec: AccessRecord, method: str, response: Response, *,
                       extra_headers: Optional[dict] = None, close: bool = False) -> Outcome:
        """Send ``response``; always closes its body. Returns KEEP or CLOSE."""
        body = response.body
        if type(body) is BytesBody or type(body) is EmptyBody:
            outcome = self._write_now(rec, method, response, extra_headers, close)
            try:
                await self._drain()
            except ClientGone as exc:
                return self._client_gone(rec, exc)
            return outcome
        rec.status = response.status
        bytes_before = rec.bytes
        try:
            try:
                head_bytes = self._response_head(method, response, extra_headers, close)
            except http1.LocalProtocolError as exc:
                self.writer.write(self._invalid_head(rec, exc))
                await self._drain()
                return CLOSE
            if _bodiless(method, response.status):
                # the head and end-of-message (nothing, with Content-Length) in one write
                self.writer.write(head_bytes + self.conn.end_response())
            elif (isinstance(body, FileBody) and self.tls_host is None and body.length
                    and self.writer.transport.get_extra_info("sslcontext") is None):
                self.writer.write(head_bytes)
                await self._send_file(rec, body)
                self.writer.write(self.conn.end_response())
            else:
                # bodies whose first chunk never waits on the network (a file, nothing) go out
                # with the head; others get the head at once (a client sees the status while a
                # slow upstream is still producing the body)
                if not (isinstance(body, FileBody) or body.length == 0):
                    self.writer.write(head_bytes)
                    head_bytes = b""
                head_bytes = await self._send_stream(rec, body, head_bytes)
                if head_bytes:                   # no chunk came: the head goes with the end
                    try:
                        end = self.conn.end_response()
                    except http1.LocalProtocolError:
                        self.writer.write(head_bytes)    # as if it had been sent first
                        raise
                    self.writer.write(head_bytes + end)
                else:
                    self.writer.write(self.conn.end_response())
            await self._drain()
        except ClientGone as exc:
            return self._client_gone(rec, exc)
        except BodyFailed:
            # abort: the client must see a cut connection, not a complete-looking body
            self.writer.transport.abort()
            return CLOSE
        except http1.LocalProtocolError as exc:
            # the body did not match its declared length: never let it look complete
            rec.error = f"response body: {exc}"
            log.warning("response_body_mismatch", request_id=rec.id, host=rec.host, error=str(exc))
            self.writer.transport.abort()
            return CLOSE
        finally:
            sent = rec.bytes - bytes_before
            if sent > 0 and response.source in ("cache", "upstream"):
                self._served_bytes(response.source, sent)
            try:
                await body.close()
            except Exception:  # noqa: BLE001
                log.exception("body_close_failed", request_id=rec.id)
        if self.conn.our_state is not http1.DONE or close:
            return CLOSE
        return KEEP

    async def _send_stream(self, rec: AccessRecord, body, pending: bytes = b"") -> bytes:
        """Send the body's chunks; ``pending`` (the response head, when not written yet) goes
        out together with the first chunk. Returns what is still pending (b"" once written)."""
        iterator = body.chunks().__aiter__()
        write = self.writer.write
        while True:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return pending
            except ClientGone:
                raise
            except Exception as exc:  # noqa: BLE001 - upstream/cache failure mid-body
                if pending:
                    write(pending)               # the head, as if it had been sent first
                rec.error = f"response body failed after {rec.bytes} bytes: {exc}"
                log.warning("response_body_failed", request_id=rec.id, host=rec.host,
                            bytes=rec.bytes, error=str(exc) or type(exc).__name__)
                raise BodyFailed(rec.error) from None
            if not chunk:
                continue
            pieces = self.conn.send_data(chunk)
            if pending:
                if len(chunk) <= COALESCE_LIMIT:
                    pieces = [pending, *pieces]
                else:
                    write(pending)
                pending = b""
            if len(pieces) == 1:
                write(pieces[0])
            else:
                write(b"".join(pieces))
            rec.bytes += len(chunk)
            await self._drain()

    async def _copy_region(self, rec: AccessRecord, f, offset: int, remaining: int) -> None:
        while remaining > 0:
            data = os.pread(f.fileno(), min(256 * 1024, remaining), offset)
            if not data:
                raise OSError("cached file is shorter than expected")
            self.writer.write(data)
            offset += len(data)
            remaining -= len(data)
            rec.bytes += len(data)
            await self._drain()

    async def _send_file(self, rec: AccessRecord, body: FileBody) -> None:
        # the state machine accounts for the whole region up front; the bytes go by sendfile
        prefix, suffix = self.conn.frame_region(body.length)
        if prefix:
            self.writer.write(prefix)
        await self._drain()
        try:
            with open(body.path, "rb") as f:
                offset, remaining = body.offset, body.length
                while remaining > 0:
                    count = min(SENDFILE_SLICE, remaining)
                    try:
                        async with asyncio.timeout(self._idle_timeout):
                            sent = await self._loop.sendfile(self.writer.transport, f,
                                                             offset, count)
                    except NotImplementedError:
                        # event loops without sendfile (uvloop): copy the rest of the region
                        await self._copy_region(rec, f, offset, remaining)
                        break
                    if sent <= 0:
                        raise OSError(f"{body.path} is shorter than expected")
                    offset += sent
                    remaining -= sent
                    rec.bytes += sent
        except (ConnectionError, TimeoutError) as exc:
            raise ClientGone(str(exc) or "client stopped reading") from None
        except OSError as exc:
            rec.error = f"sendfile failed after {rec.bytes} bytes: {exc}"
            log.warning("response_body_failed", request_id=rec.id, host=rec.host,
                        bytes=rec.bytes, error=str(exc))
            raise BodyFailed(rec.error) from None
        if suffix:
            self.writer.write(suffix)
