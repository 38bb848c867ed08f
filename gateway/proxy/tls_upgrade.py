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


class LeanSSLProtocol(sslproto.SSLProtocol):
    """asyncio's SSLProtocol without a receive buffer of its own (see the module docstring)."""

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
