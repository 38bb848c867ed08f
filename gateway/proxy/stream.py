"""The transport-facing half of a client connection: an ``asyncio.Protocol`` with two consumers.

Why not ``asyncio.start_server``'s StreamReader/StreamWriter: a cached POM answered through them
costs a future per read, a task wake-up per request and copies in and out of the reader's buffer,
which on a small hit is more than the hit itself (issue 13; ``docs/hit-path.md``). A bare
``Protocol`` gets the decrypted bytes in ``data_received`` and may answer in the same callback.

Invariants:

* Exactly one consumer takes the bytes at a time. In **callback mode** (``on_data`` set) every
  chunk, and ``b""`` for EOF, goes straight to ``on_data`` — the connection parses and answers in
  the callback, no task. In **task mode** (``on_data`` None) bytes are buffered and the
  connection's task pulls them with :meth:`read` (StreamReader's contract: up to ``n`` bytes,
  ``b""`` at EOF, the connection's error once it is lost).
* The buffer of task mode holds at most one read beyond :data:`HIGH_WATER`: reading from the
  socket is paused above it and resumed when :meth:`read` takes it below :data:`LOW_WATER`.
* Writes go to the transport; :meth:`drain` waits while the transport has paused the protocol's
  writing (its write buffer above the high-water mark) and fails once the connection is lost.
* The object outlives a switch to TLS (``start_tls``): ``connection_made`` is called again with
  the TLS transport, and only the first call announces the connection to the server.

It is also the "reader" and the "writer" of the connection (``read``, ``write``, ``drain``,
``write_eof``…, the subset of the stream API the tunnel pipe and the response writer use), so a
task-mode connection reads and writes as it did with streams.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Optional

#: task mode pauses reading from the socket above this many buffered bytes
HIGH_WATER = 256 * 1024
#: … and resumes below this
LOW_WATER = 64 * 1024


class ClientStream(asyncio.Protocol):
    """``ClientStream(on_connected)``: ``on_connected(stream)`` runs once, on the first
    ``connection_made`` (the server creates the connection object there)."""

    def __init__(self, on_connected: Callable[["ClientStream"], None]) -> None:
        self._on_connected: Optional[Callable[["ClientStream"], None]] = on_connected
        self.transport: Optional[asyncio.Transport] = None
        #: callback mode's consumer (``b""``: EOF); None: task mode, bytes are buffered
        self.on_data: Optional[Callable[[bytes], None]] = None
        #: told once when the connection is lost (after waiters were woken)
        self.on_lost: Optional[Callable[[Optional[BaseException]], None]] = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._lost = False
        self._exc: Optional[BaseException] = None
        self._waiter: Optional[asyncio.Future] = None
        self._read_paused = False
        #: the transport's write buffer is above its high-water mark (drain before more); an
        #: attribute, not a property: read on every answer
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        #: the transport is (or is about to be) TLS: EOF cannot be half a close there
        self.tls = False

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.transport = transport  # type: ignore[assignment]
        self._read_paused = False
        self.write_paused = False
        if transport.get_extra_info("sslcontext") is not None:
            self.tls = True
        announce, self._on_connected = self._on_connected, None
        if announce is not None:
            announce(self)

    def data_received(self, data: bytes) -> None:
        consumer = self.on_data
        if consumer is not None:
            consumer(data)
            return
        self._chunks.append(data)
        self._size += len(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._size > HIGH_WATER and not self._read_paused:
            self.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        consumer = self.on_data
        if consumer is not None:
            consumer(b"")
        else:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        # plain TCP: keep the write side open, a client that half-closed after its request
        # still gets the answer; TLS has no half-close (and asyncio warns on True there)
        return not self.tls

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._lost = True
        self._exc = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_exception(ConnectionResetError("Connection lost"))
        self._drain_waiters.clear()
        lost, self.on_lost = self.on_lost, None
        if lost is not None:
            lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    # -- reading (task mode) -----------------------------------------------------------------
    @property
    def buffered(self) -> int:
        """Bytes received in task mode and not read yet."""
        return self._size

    @property
    def at_eof(self) -> bool:
        """The client closed its side or the connection is gone (after what is buffered)."""
        return self._eof or self._lost

    def take(self) -> bytes:
        """Everything buffered, at once (the connection going back to callback mode)."""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        self._size = 0
        if self._read_paused:
            self.resume_reading()
        return data

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; ``b""`` at EOF; the connection's error when it was lost with one."""
        if not self._chunks:
            if self._lost and self._exc is not None:
                raise self._exc
            if self._eof or self._lost:
                return b""
            if self._read_paused:
                self.resume_reading()
            if self._waiter is not None:
                raise RuntimeError("read() called while another read is waiting")
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._chunks:
                if self._lost and self._exc is not None:
                    raise self._exc
                return b""
        chunks = self._chunks
        if self._size <= n:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._chunks = []
            self._size = 0
        else:
            joined = b"".join(chunks)
            data, rest = joined[:n], joined[n:]
            self._chunks = [rest]
            self._size = len(rest)
        if self._read_paused and self._size <= LOW_WATER:
            self.resume_reading()
        return data

    def pause_reading(self) -> None:
        self._read_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._read_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- writing -----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self.transport.is_closing():  # type: ignore[union-attr]
            # let connection_lost run (as StreamWriter.drain does) so a dead peer is noticed
            await asyncio.sleep(0)
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if not self.write_paused:
            return
        fut = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        await fut

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()  # type: ignore[union-attr]

    def write_eof(self) -> None:
        self.transport.write_eof()  # type: ignore[union-attr]

    def is_closing(self) -> bool:
        return self.transport.is_closing()  # type: ignore[union-attr]

    def close(self) -> None:
        self.transport.close()  # type: ignore[union-attr]

    def get_extra_info(self, name: str, default=None):
        return self.transport.get_extra_info(name, default)  # type: ignore[union-attr]
