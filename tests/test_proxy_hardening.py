"""Regression tests for the proxy side of the hardening issue (memory per intercepted connection,
first-byte and per-address limits, request-target and Host rules, log hygiene, proxy-auth
failures), over real sockets and real TLS."""
from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import threading
import tracemalloc

import pytest
from structlog.testing import capture_logs

from gateway.proxy.memory import MemoryReleaser

from proxy_support import make_settings, raw_request, running_gateway, status_line

RULES = [{"host": "registry.test", "action": "intercept"}]


def _intercepted_socket(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A blocking client: CONNECT, TLS, one request answered in full; left open and idle."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"CONNECT registry.test:443 HTTP/1.1\r\nHost: registry.test:443\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(1024)
    assert data.startswith(b"HTTP/1.1 200")
    tls = ctx.wrap_socket(sock, server_hostname="registry.test")
    tls.sendall(b"GET /hello HTTP/1.1\r\nHost: registry.test\r\n\r\n")
    data = b""
    while not data.endswith(b"hello https://registry.test/hello\n"):
        piece = tls.recv(4096)
        assert piece
        data += piece
    return tls


async def _wait_for(predicate, tries: int = 100) -> None:
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


# -- D2: memory per idle intercepted connection ------------------------------------------------

async def test_idle_intercepted_connection_holds_no_large_python_buffer(tmp_path):
    """asyncio's SSLProtocol kept a 256 KiB bytearray per connection; Python-allocated memory per
    idle intercepted connection (both ends of it in this process) must stay well below 32 KiB."""
    n = 40
    async with running_gateway(make_settings(tmp_path, rules=RULES)) as gw:
        ctx = ssl.create_default_context(cafile=gw.ca_path)
        loop = asyncio.get_running_loop()
        warm = await loop.run_in_executor(None, _intercepted_socket, gw.port, ctx)
        warm.close()
        await _wait_for(lambda: gw.server.active_connections == 0)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            socks = [await loop.run_in_executor(None, _intercepted_socket, gw.port, ctx)
                     for _ in range(n)]
            await _wait_for(lambda: gw.server.active_connections == n)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        for s in socks:
            s.close()
        await _wait_for(lambda: gw.server.active_connections == 0)
    per_connection = (held - before) / n
    assert per_connection < 32 * 1024, per_connection


async def test_memory_releaser_trims_after_a_wave_of_closes():
    releaser = MemoryReleaser(every=3, delay=0)
    for _ in range(2):
        releaser.connection_closed()
    await asyncio.sleep(0.01)
    assert releaser.trims == 0
    releaser.connection_closed()
    await _wait_for(lambda: releaser.trims == 1)


# -- D14: no asyncio warning when a client closes right after its handshake --------------------

class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _handshake_then_close_notify(port: int, ca_path: str) -> None:
    """The client's last handshake flight and its close_notify reach the gateway in ONE segment,
    so the gateway sees EOF in the same read that completes its handshake."""
    ctx = ssl.create_default_context(cafile=ca_path)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3       # the client's Finished ends the handshake
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(b"CONNECT registry.test:443 HTTP/1.1\r\nHost: registry.test:443\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(1024)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname="registry.test")
        for _ in range(20):
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                piece = sock.recv(65536)
                assert piece
                incoming.write(piece)
        try:
            obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        sock.sendall(outgoing.read())                   # Finished + close_notify together
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    finally:
        sock.close()


async def test_client_closing_right_after_handshake_logs_no_asyncio_warning(tmp_path):
    handler = _Records()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)
    try:
        async with running_gateway(make_settings(tmp_path, rules=RULES)) as gw:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(None, _handshake_then_close_notify,
                                                        gw.port, gw.ca_path) for _ in range(20)))
            await _wait_for(lambda: gw.server.active_connections == 0)
    finally:
        asyncio_logger.removeHandler(handler)
    messages = [r.getMessage() for r in handler.records]
    assert not [m for m in messages if "eof_received" in m], messages
