"""Upgrading an accepted client connection to TLS in place, at a few KiB per idle connection.

Why not ``loop.start_tls`` as is: asyncio's :class:`~asyncio.sslproto.SSLProtocol` (3.11+)
allocates a receive buffer of ``max_size`` = 256 KiB in its constructor and keeps it for the
connection's life. With thousands of idle intercepted connections (Trivy keeps its connections
alive) that is ~256 KiB RSS each — 3,000 connections held ~860 MiB (``bench/idle_tls.py``) — and
the memory does not go back after they close: once glibc has freed a 256 KiB block its adaptive
mmap threshold rises above it, so the next ones come from the heap and fragment it.

The buffer is only ever used between two calls the selector transport makes back to back —
``get_buffer()``, ``recv_into()``, ``buffered_updated()`` — and ``buffer_updated`` copies the
bytes into the SSL object's incoming MemoryBIO at once. So :class:`LeanSSLProtocol` hands out one
256 KiB buffer per thread (an event loop runs in one thread) to all its connections: reads from
the socket stay as large as before (no extra syscalls for uploads), and a connection holds only
what OpenSSL itself keeps (it releases its record buffers when idle). Its ``max_size`` (also the
size asked of ``SSLObject.read``, which never returns more than one 16 KiB TLS record anyway) is
one record, so a read no longer allocates a 256 KiB bytes object to shrink it again.

:func:`start_tls` is ``BaseEventLoop.start_tls`` (3.11) with that protocol and with
``call_connection_made=True``: the application protocol is connected when the handshake completes,
*before* any decrypted data or EOF reaches it. (``loop.start_tls`` connects it only when the
caller's coroutine resumes; a client that closes right after its handshake — a handshake storm —
then made the StreamReaderProtocol used at the time run ``eof_received`` unconnected, return True, and asyncio log
"returning true from eof_received() has no effect when using ssl" on stderr.)

Event loops that are not the stdlib selector loop (uvloop has its own SSL protocol) get
``loop.start_tls``; the connection's :class:`~.stream.ClientStream` returns False from
``eof_received`` on TLS (there is no half-close there), which keeps the warning away there too.
"""
from __future__ import annotations

import asyncio
import ssl
import sys
import threading
from asyncio import selector_events, sslproto
from typing import Optional

#: the shared receive buffer's size: asyncio's own per-connection size
RECV_BUFFER = 256 * 1024
#: the largest plaintext one TLS record carries (RFC 8446 §5.1), what SSLObject.read returns at most
TLS_RECORD = 16 * 1024

_local = threading.local()


def _shared_view() -> memoryview:
    view = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(RECV_BUFFER))
    return view


_WRAPPED = sslproto.SSLProtocolState.WRAPPED
_AGAIN = sslproto.SSLAgainErrors
#: the SSLProtocol whose private steps the lean ones below replace: asyncio's of 3.11 to 3.13
#: (the same state machine and attribute names); on another Python the stock steps run
LEAN_STEPS = sys.version_info[:2] in ((3, 11), (3, 12), (3, 13)) and all(
    hasattr(sslproto.SSLProtocol, name) for name in (
        "buffer_updated", "_do_read", "_do_read__copied", "_do_write", "_write_appdata",
        "_process_outgoing", "_control_app_writing", "_control_ssl_reading",
        "_call_eof_received", "_start_shutdown", "_fatal_error")) and hasattr(
    # ssl.SSLObject's read/write/pending are one-line Python wrappers around this object's
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO()),
    "_sslobj")


class LeanSSLProtocol(sslproto.SSLProtocol):
    """asyncio's SSLProtocol without a receive buffer of its own (see the module docstring),
    and with leaner steps for what every request of a kept-alive connection does.

    Why the steps: a small request and its answer cost about 15 Python calls in asyncio's
    SSLProtocol, and its read loop ends every read in an ``SSLWantReadError`` (~0.9 µs to raise
    and catch: more than the rest of the read). On a small cache hit that was a tenth of what
    the gateway spent (``docs/hit-path.md``). The replacements make the same transitions with
    the same OpenSSL calls, minus the ones whose outcome is known:

    * reading stops when nothing is left to decrypt — the incoming BIO is empty and the SSL
      object holds no decrypted bytes — instead of at the exception the next read would
      raise (OpenSSL takes only whole records from the BIO: a partial one stays there, counted
      in ``pending``, or makes the read that took it raise as before);
    * one write with nothing waiting goes to ``SSLObject.write`` and out at once, without the
      backlog list (anything else: asyncio's step);
    * the write and read buffer limits are looked at where they can have been crossed.

    Only on the Pythons whose SSLProtocol these steps were written against
    (:data:`LEAN_STEPS`); ``tests/test_tls_lean_protocol.py`` drives record boundaries,
    close_notify and flow control through them.
    """

    max_size = TLS_RECORD

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # the constructor allocated max_size bytes; the shared buffer replaces them
        self._ssl_buffer = None
        self._ssl_buffer_view = None

    def get_buffer(self, n: int) -> memoryview:
        # buffer_updated() reads self._ssl_buffer_view: point it at the shared buffer
        view = self._ssl_buffer_view = _shared_view()
        return view

    if LEAN_STEPS:
        def buffer_updated(self, nbytes: int) -> None:
            # asyncio's buffer_updated → _do_read for a wrapped connection, in one step
            self._incoming.write(self._ssl_buffer_view[:nbytes])
            if self._state is not _WRAPPED or self._app_reading_paused \
                    or self._app_protocol_is_buffer:
                if self._state is _WRAPPED:
                    self._do_read()
                else:
                    super().buffer_updated(0)    # the BIO has the bytes; 0: nothing more
                return
            try:
                self._do_read__copied()
                if self._write_backlog:
                    self._do_write()
                else:
                    self._process_outgoing()
                self._control_ssl_reading()
            except Exception as ex:  # noqa: BLE001 - as asyncio's _do_read
                self._fatal_error(ex, "Fatal error on SSL protocol")

        def _do_read__copied(self) -> None:
            sslobj, incoming = self._sslobj._sslobj, self._incoming
            first: Optional[bytes] = None
            more: Optional[list[bytes]] = None
            chunk = b"1"
            try:
                while True:
                    chunk = sslobj.read(self.max_size)
                    if not chunk:
                        break                        # close_notify
                    if first is None:
                        first = chunk
                    elif more is None:
                        more = [first, chunk]
                    else:
                        more.append(chunk)
                    if not incoming.pending and not sslobj.pending():
                        break                        # the next read would raise SSLWantReadError
            except _AGAIN:
                pass
            if first is not None:
                self._app_protocol.data_received(first if more is None else b"".join(more))
            if not chunk:
                self._call_eof_received()
                self._start_shutdown()

        def _write_appdata(self, list_of_data) -> None:
            if self._state is not _WRAPPED or self._write_backlog or len(list_of_data) != 1:
                super()._write_appdata(list_of_data)
                return
            data = list_of_data[0]
            try:
                count = self._sslobj._sslobj.write(data)
            except _AGAIN:
                count = 0
            except Exception as ex:  # noqa: BLE001 - as asyncio's _write_appdata
                self._fatal_error(ex, "Fatal error on SSL protocol")
                return
            if count < len(data):                # kept for the next write (asyncio's backlog)
                rest = data[count:]
                self._write_backlog.append(rest)
                self._write_buffer_size += len(rest)
            self._process_outgoing()

        def _process_outgoing(self) -> None:
            outgoing = self._outgoing
            if not self._ssl_writing_paused and outgoing.pending:
                self._transport.write(outgoing.read())
            if self._app_writing_paused or (
                    outgoing.pending + self._write_buffer_size >= self._outgoing_high_water):
                self._control_app_writing()

        def _control_ssl_reading(self) -> None:
            if self._ssl_reading_paused or self._incoming.pending >= self._incoming_high_water:
                super()._control_ssl_reading()


def lean_start_tls_supported(loop: asyncio.AbstractEventLoop, transport) -> bool:
    return (isinstance(loop, selector_events.BaseSelectorEventLoop)
            and isinstance(transport, selector_events._SelectorSocketTransport))


async def start_tls(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                    protocol: asyncio.Protocol, sslcontext: ssl.SSLContext, *,
                    server_side: bool = True, ssl_handshake_timeout: Optional[float] = None,
                    ) -> asyncio.Transport:
    """Upgrade ``transport`` to TLS; ``protocol`` is connected to the returned transport.

    Unlike ``loop.start_tls`` the caller must not call ``protocol.connection_made`` itself.
    """
    if not lean_start_tls_supported(loop, transport):
        tls_transport = await loop.start_tls(transport, protocol, sslcontext,
                                             server_side=server_side,
                                             ssl_handshake_timeout=ssl_handshake_timeout)
        protocol.connection_made(tls_transport)
        return tls_transport
    waiter = loop.create_future()
    ssl_protocol = LeanSSLProtocol(loop, protocol, sslcontext, waiter, server_side, None,
                                   ssl_handshake_timeout=ssl_handshake_timeout,
                                   call_connection_made=True)
    # taken now: the protocol forgets it if the connection is lost before we resume
    app_transport = ssl_protocol._app_transport
    # as in BaseEventLoop.start_tls: pause so no data reaches the SSL protocol before its
    # connection_made (which starts the handshake)
    transport.pause_reading()
    transport.set_protocol(ssl_protocol)
    conmade_cb = loop.call_soon(ssl_protocol.connection_made, transport)
    resume_cb = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        conmade_cb.cancel()
        resume_cb.cancel()
        raise
    return app_transport
