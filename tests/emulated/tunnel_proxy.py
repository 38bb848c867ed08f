"""A plain CONNECT tunnel proxy (test tooling only, not the gateway).

``CONNECT host:443`` (``CONNECT host:port`` for a world host named ``host:port``,
e.g. ``registry.test:5443``) is mapped to ``127.0.0.1:port_of(host)`` and bytes are
piped blindly in both directions.  Used to run the real Trivy against the
emulated world: ``HTTPS_PROXY=http://127.0.0.1:<port> SSL_CERT_FILE=<ca>``.
Unknown hosts get ``502``; anything but CONNECT gets ``405``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT = 15.0
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0


@dataclass
class TunnelRecord:
    target: str
    status: int
    t: float
    bytes_up: int = 0
    bytes_down: int = 0


class TunnelProxy:
    def __init__(self, overrides: dict[str, str], host: str = "127.0.0.1", port: int = 0) -> None:
        self.overrides = dict(overrides)
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._lock = threading.Lock()
        self.records: list[TunnelRecord] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> "TunnelProxy":
        self._server = await asyncio.start_server(self._on_conn, self.host, self.port, limit=HEAD_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is not None:
            srv.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def __aenter__(self) -> "TunnelProxy":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def connects(self) -> list[TunnelRecord]:
        with self._lock:
            return list(self.records)

    def _resolve(self, target: str) -> tuple[str, int] | None:
        host, _, port = target.rpartition(":")
        if not host:
            return None
        addr = self.overrides.get(target.lower()) or (
            self.overrides.get(host.lower()) if port == "443" else None)
        if not addr:
            return None
        h, _, p = addr.rpartition(":")
        return h, int(p)

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task:
            self._tasks.add(task)
        rec: TunnelRecord | None = None
        up_w: asyncio.StreamWriter | None = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3 or parts[0].upper() != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            target = parts[1]
            rec = TunnelRecord(target, 0, time.monotonic())
            with self._lock:
                self.records.append(rec)
            addr = self._resolve(target)
            if addr is None:
                rec.status = 502
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            try:
                up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*addr), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                rec.status = 502
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            rec.status = 200
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
                try:
                    while True:
                        data = await asyncio.wait_for(src.read(65536), IDLE_TIMEOUT)
                        if not data:
                            break
                        dst.write(data)
                        await dst.drain()
                        if up:
                            rec.bytes_up += len(data)
                        else:
                            rec.bytes_down += len(data)
                except (ConnectionError, asyncio.TimeoutError, OSError):
                    pass
                finally:
                    try:
                        if dst.can_write_eof():
                            dst.write_eof()
                    except (OSError, RuntimeError):
                        pass

            t1 = asyncio.ensure_future(pipe(reader, up_w, True))
            t2 = asyncio.ensure_future(pipe(up_r, writer, False))
            try:
                await asyncio.gather(t1, t2)
            finally:
                t1.cancel()
                t2.cancel()
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (up_w, writer):
                if w is not None:
                    try:
                        w.transport.abort()
                    except Exception:
                        pass
            if task:
                self._tasks.discard(task)


class TunnelProxyThread:
    """A TunnelProxy on its own loop/thread (when no WorldThread is around)."""

    def __init__(self, overrides: dict[str, str]) -> None:
        self.proxy = TunnelProxy(overrides)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tunnel-proxy", daemon=True)

    def start(self) -> TunnelProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(10)
        return self.proxy

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()
