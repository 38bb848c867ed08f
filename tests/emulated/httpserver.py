"""A small HTTP/1.1-over-TLS server per emulated host.

Hand-written on asyncio streams (rather than a framework) so that faults can
act on the wire: cut a connection mid-body with Content-Length announced, flip
a byte, throttle, hang, drop a connection, refuse connections.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Awaitable, Callable
from urllib.parse import parse_qs

from .accesslog import AccessLog, LogEntry
from .faults import Fault, FaultBook

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
MAX_REQUEST_BODY = 1024 * 1024
IDLE_TIMEOUT = 60.0
CHUNK = 64 * 1024


@dataclass
class Request:
    host: str
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: list[tuple[str, str]]
    conn_id: int
    sni: str | None
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        n = name.lower()
        vals = [v for k, v in self.headers if k.lower() == n]
        return ", ".join(vals) if vals else default

    def headers_dict(self) -> dict[str, str]:
        d: dict[str, str] = {}
        for k, v in self.headers:
            kl = k.lower()
            d[kl] = f"{d[kl]}, {v}" if kl in d else v
        return d

    @property
    def params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    def param(self, name: str, default: str | None = None) -> str | None:
        v = self.params.get(name)
        return v[0] if v else default


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | memoryview = b""
    note: str = ""
    # for HEAD answers: the Content-Length to announce when body is empty
    head_length: int | None = None

    def set_header(self, name: str, value: str) -> None:
        self.headers = [(k, v) for k, v in self.headers if k.lower() != name.lower()]
        self.headers.append((name, value))

    def get_header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


Handler = Callable[[Request], Awaitable[Response]]


def text_response(status: int, text: str | bytes, content_type: str = "text/plain; charset=utf-8",
                  headers: list[tuple[str, str]] | None = None) -> Response:
    body = text.encode() if isinstance(text, str) else text
    return Response(status, [("Content-Type", content_type)] + list(headers or []), body)


class HostServer:
    """TLS listener for one emulated host on 127.0.0.1:port."""

    def __init__(
        self,
        host: str,
        handler: Handler,
        ssl_ctx: ssl.SSLContext,
        access_log: AccessLog,
        faults: FaultBook,
        conn_counter: Callable[[], int],
        port: int = 0,
        strict_host: bool = True,
    ) -> None:
        self.host = host
        self.handler = handler
        self.ssl_ctx = ssl_ctx
        self.log = access_log
        self.faults = faults
        self._next_conn = conn_counter
        self.port = port
        self.strict_host = strict_host
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._stalled = False

    @property
    def listening(self) -> bool:
        return self._server is not None and not self._stalled

    async def start(self) -> None:
        if self._server is not None and self._stalled:
            await self.stop_listening()
            await self.close_connections()
        if self._server is not None:
            return
        self._stalled = False
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(
            self._on_conn, sock=sock, ssl=self.ssl_ctx, limit=MAX_HEAD, ssl_handshake_timeout=15
        )

    async def stop_listening(self) -> None:
        """Close the listening socket (new connections are refused)."""
        srv, self._server = self._server, None
        if srv is not None:
            srv.close()

    async def stall(self, max_seconds: float = 30.0) -> None:
        """Replace the TLS listener by one that accepts TCP connections and
        never speaks (no TLS handshake); each is closed after *max_seconds*.
        ``start()`` restores normal service."""
        await self.stop_listening()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        sock.setblocking(False)

        async def _hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
            self._writers.add(writer)
            try:
                await asyncio.sleep(max_seconds)
            except asyncio.CancelledError:
                pass
            finally:
                self._writers.discard(writer)
                if task is not None:
                    self._tasks.discard(task)
                writer.transport.abort()

        self._server = await asyncio.start_server(_hold, sock=sock)
        self._stalled = True

    async def close_connections(self) -> None:
        for w in list(self._writers):
            try:
                w.transport.abort()
            except Exception:  # pragma: no cover - best effort
                pass
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def stop(self) -> None:
        await self.stop_listening()
        await self.close_connections()

    # ------------------------------------------------------------------ conns
    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        conn_id = self._next_conn()
        sslobj = writer.get_extra_info("ssl_object")
        sni = getattr(sslobj, "_emu_sni", None) if sslobj is not None else None
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                        ConnectionError, ssl.SSLError, ValueError):
                    break
                req = self._parse(head, conn_id, sni)
                if req is None:
                    await self._raw_error(writer, 400)
                    break
                clen = req.header("content-length")
                if req.header("transfer-encoding"):
                    await self._raw_error(writer, 411)
                    break
                if clen:
                    try:
                        n = int(clen)
                    except ValueError:
                        await self._raw_error(writer, 400)
                        break
                    if n > MAX_REQUEST_BODY:
                        await self._raw_error(writer, 413)
                        break
                    try:
                        req.body = await asyncio.wait_for(reader.readexactly(n), IDLE_TIMEOUT)
                    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                        break
                keep = await self._serve(req, writer)
                if not keep:
                    break
        except asyncio.CancelledError:
            pass
        except Exception:  # pragma: no cover - never crash the loop
            log.exception("emulated %s: connection handler failed", self.host)
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            try:
                writer.transport.abort() if writer.transport.is_closing() else writer.close()
            except Exception:  # pragma: no cover
                pass

    def _parse(self, head: bytes, conn_id: int, sni: str | None) -> Request | None:
        try:
            text = head.decode("latin-1")
            lines = text.split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            headers: list[tuple[str, str]] = []
            for line in lines[1:]:
                if not line:
                    continue
                k, v = line.split(":", 1)
                headers.append((k.strip(), v.strip()))
        except ValueError:
            return None
        path, _, query = target.partition("?")
        return Request(self.host, method.upper(), target, path, query, version, headers, conn_id, sni)

    async def _raw_error(self, writer: asyncio.StreamWriter, status: int) -> None:
        reason = HTTPStatus(status).phrase
        try:
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await asyncio.wait_for(writer.drain(), 5)
        except Exception:
            pass

    # --------------------------------------------------------------- requests
    async def _serve(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        entry = self.log.start(
            host=self.host,
            method=req.method,
            path=req.path,
            query=req.query,
            request_headers=req.headers_dict(),
            conn_id=req.conn_id,
            sni=req.sni,
        )
        keep_alive = not (
            (req.header("connection") or "").lower() == "close" or req.version.upper() == "HTTP/1.0"
        )
        try:
            fault = self.faults.take_request_fault(self.host, req.method, req.path)
            if fault is not None:
                handled, keep = await self._request_fault(fault, req, writer, entry)
                if handled:
                    return keep and keep_alive
            host_hdr = (req.header("host") or "").lower()
            if self.strict_host and host_hdr not in (self.host, f"{self.host}:443"):
                resp = text_response(421, f"misdirected request: Host {host_hdr!r} is not {self.host}\n")
                resp.note = "bad-host"
            else:
                resp = await self.handler(req)
            return await self._send(req, resp, writer, entry) and keep_alive
        except (ConnectionError, ssl.SSLError, asyncio.TimeoutError):
            self.log.finish(entry, note="client-gone")
            return False
        except asyncio.CancelledError:
            self.log.finish(entry, note="cancelled")
            raise
        except Exception as exc:  # handler bug: answer 500 and keep going
            log.exception("emulated %s: handler failed", self.host)
            resp = text_response(500, f"emulated handler error: {exc!r}\n")
            try:
                return await self._send(req, resp, writer, entry) and keep_alive
            except Exception:
                self.log.finish(entry, note="client-gone")
                return False
        finally:
            if not entry.done:
                self.log.finish(entry)

    async def _request_fault(self, fault: Fault, req: Request, writer: asyncio.StreamWriter,
                             entry: LogEntry) -> tuple[bool, bool]:
        p = fault.params
        if fault.kind == "status":
            resp = Response(int(p["status"]), list(p.get("headers") or []), p.get("body") or b"",
                            note=f"fault:{p['status']}")
            if isinstance(resp.body, str):
                resp.body = resp.body.encode()
            if not resp.get_header("content-type") and resp.body:
                resp.headers.append(("Content-Type", p.get("content_type", "application/json")))
            keep = await self._send(req, resp, writer, entry)
            return True, keep
        if fault.kind == "hang":
            max_s = float(p.get("max_seconds", 30.0))
            entry.note = "hang"
            try:
                await asyncio.sleep(max_s)
            finally:
                self.log.finish(entry, note="hang-ended")
            writer.transport.abort()
            return True, False
        if fault.kind == "drop":
            self.log.finish(entry, note="dropped")
            if p.get("reset"):
                _set_linger_zero(writer)
            writer.transport.abort()
            return True, False
        if fault.kind == "delay":
            await asyncio.sleep(float(p.get("seconds", 1.0)))
            return False, True
        return False, True

    async def _send(self, req: Request, resp: Response, writer: asyncio.StreamWriter, entry: LogEntry) -> bool:
        status = resp.status
        body = resp.body
        head_only = req.method == "HEAD" or status in (204, 304) or status < 200
        headers = list(resp.headers)
        names = {k.lower() for k, _ in headers}
        if "date" not in names:
            headers.append(("Date", email.utils.formatdate(usegmt=True)))
        if "content-length" not in names and status not in (204, 304) and status >= 200:
            length = len(body) if (body or resp.head_length is None) else resp.head_length
            headers.append(("Content-Length", str(length)))
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        entry.status = status
        entry.response_headers = {k.lower(): v for k, v in headers}
        cl = entry.response_headers.get("content-length")
        entry.content_length = int(cl) if cl and cl.isdigit() else None
        if resp.note:
            entry.note = resp.note

        body_faults: dict[str, Fault] = {}
        if not head_only and status in (200, 206) and len(body) > 0:
            body_faults = self.faults.take_body_faults(self.host, req.method, req.path)

        if head_only or not body:
            # complete the entry before the client can possibly see the answer
            self.log.finish(entry)
            writer.write(head.encode("latin-1"))
            await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)
            return True
        writer.write(head.encode("latin-1"))

        total = len(body)
        cut = body_faults.get("cut")
        corrupt = body_faults.get("corrupt")
        throttle = body_faults.get("throttle")
        limit = total
        if cut is not None:
            limit = min(total, max(0, int(cut.params.get("after", 0))))
        corrupt_at = int(corrupt.params.get("offset", 0)) if corrupt is not None else -1
        if corrupt is not None and not (0 <= corrupt_at < total):
            corrupt_at = total // 2
        rate = float(throttle.params["bytes_per_second"]) if throttle is not None else 0.0
        chunk = CHUNK if rate <= 0 else max(1, min(CHUNK, int(rate / 20) or 1))
        notes = []
        if corrupt is not None:
            notes.append(f"corrupt@{corrupt_at}")
        if throttle is not None:
            notes.append(f"throttle@{int(rate)}B/s")
        mv = memoryview(body) if not isinstance(body, memoryview) else body
        sent = 0
        t0 = time.monotonic()
        while sent < limit:
            n = min(chunk, limit - sent)
            piece = mv[sent:sent + n]
            if sent <= corrupt_at < sent + n:
                b = bytearray(piece)
                b[corrupt_at - sent] ^= 0xFF
                piece = bytes(b)
            if sent + n >= total:
                # last piece: complete the log entry before the client can
                # observe the end of the response
                entry.bytes_sent = sent + n
                self.log.finish(entry, note=" ".join(notes) if notes else None)
            writer.write(piece)
            sent += n
            entry.bytes_sent = sent
            await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)
            if rate > 0:
                due = t0 + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        if cut is not None and limit < total:
            await _flush(writer)
            notes.append(f"cut@{limit}")
            if cut.params.get("reset"):
                _set_linger_zero(writer)
            self.log.finish(entry, note=" ".join(notes))
            writer.transport.abort()
            return False
        self.log.finish(entry, note=" ".join(notes) if notes else None)
        return True


async def _flush(writer: asyncio.StreamWriter, timeout: float = 5.0) -> None:
    """Wait (bounded) until the TLS and socket write buffers are empty."""
    deadline = time.monotonic() + timeout
    tr = writer.transport
    raw = getattr(getattr(tr, "_ssl_protocol", None), "_transport", None)
    while time.monotonic() < deadline:
        pending = tr.get_write_buffer_size()
        if raw is not None:
            pending += raw.get_write_buffer_size()
        if pending == 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


def _set_linger_zero(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
