"""Regression tests for the proxy side of the hardening issue (memory per intercepted connection,
first-byte and per-address limits, request-target and Host rules, log hygiene, proxy-auth
failures), over real sockets and real TLS."""
from __future__ import annotations

import asyncio
import base64
import gc
import logging
import socket
import ssl
import tracemalloc

import pytest
from structlog.testing import capture_logs

from gateway.exchange import ClientBodyError, error_response
from gateway.proxy.auth import FailureLimiter
from gateway.proxy.memory import MemoryReleaser

from proxy_support import (PASSWORD, MemoryHandler, make_settings, open_intercepted, raw_request,
                           running_gateway, status_line)

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


# -- D8: first byte within header_timeout; per-address connection cap --------------------------

async def test_silent_connection_is_closed_after_header_timeout_not_idle_timeout(tmp_path):
    settings = make_settings(tmp_path, rules=RULES,
                             proxy={"header_timeout": 0.3, "idle_timeout": 3600})
    async with running_gateway(settings) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        async with asyncio.timeout(10):               # a bound for the test, not a timing claim
            assert await reader.read() == b""         # closed quietly, nothing sent
        writer.close()
        assert gw.metric("trivy_gateway_client_errors_total", reason="first_byte_timeout") == 1
        # the same after CONNECT + TLS: the first request must come within header_timeout too
        ctx = ssl.create_default_context(cafile=gw.ca_path)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"CONNECT registry.test:443 HTTP/1.1\r\nHost: registry.test:443\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await writer.start_tls(ctx, server_hostname="registry.test")
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
        assert gw.metric("trivy_gateway_client_errors_total", reason="first_byte_timeout") == 2


async def test_one_address_cannot_take_every_connection(tmp_path):
    settings = make_settings(tmp_path, rules=RULES, proxy={"max_connections_per_client": 3,
                                                           "max_connections": 100})
    async with running_gateway(settings) as gw:
        held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(3)]
        await _wait_for(lambda: gw.server.active_connections == 3)
        raw = await raw_request(gw.port, b"GET http://registry.test/hello HTTP/1.1\r\n"
                                         b"Host: registry.test\r\n\r\n")
        assert status_line(raw).startswith("HTTP/1.1 429"), raw[:200]
        assert b"Retry-After: 1\r\n" in raw and b"max_connections_per_client = 3" in raw
        assert gw.metric("trivy_gateway_client_errors_total",
                         reason="too_many_connections_per_client") == 1
        # another client address (127.0.0.2 as the source address) is not affected
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port,
                                                       local_addr=("127.0.0.2", 0))
        writer.write(b"GET http://registry.test/hello HTTP/1.1\r\nHost: registry.test\r\n"
                     b"Connection: close\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.read()).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        # one of the three closes: the address gets a slot again
        held.pop()[1].close()
        await _wait_for(lambda: gw.server.active_connections == 2)
        raw = await raw_request(gw.port, b"GET http://registry.test/hello HTTP/1.1\r\n"
                                         b"Host: registry.test\r\nConnection: close\r\n\r\n")
        assert status_line(raw) == "HTTP/1.1 200 OK"
        for _, w in held:
            w.close()


# -- D11, D13: OPTIONS * in a tunnel, Host field rules ------------------------------------------

async def test_options_asterisk_in_intercepted_connection_is_answered_locally(tmp_path):
    async with running_gateway(make_settings(tmp_path, rules=RULES)) as gw:
        reader, writer = await open_intercepted(gw)
        writer.write(b"OPTIONS * HTTP/1.1\r\nHost: registry.test\r\n\r\n"
                     b"GET /hello HTTP/1.1\r\nHost: registry.test\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            raw = await reader.read()
        writer.close()
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 0" in first
    assert b"Allow: " in first
    assert rest.startswith(b"HTTP/1.1 200 OK")             # the connection carried on
    assert rest.endswith(b"hello https://registry.test/hello\n")
    assert [ex.target for ex in gw.handler.exchanges] == ["/hello"]   # nothing forwarded for *


HOST_CASES = [
    # (request head, expected status line prefix)
    (b"GET http://registry.test/hello HTTP/1.1\r\nConnection: close\r\n\r\n", "HTTP/1.1 400"),
    (b"GET http://registry.test/hello HTTP/1.1\r\nHost: registry.test\r\nHost: other.test\r\n"
     b"Connection: close\r\n\r\n", "HTTP/1.1 400"),
    (b"GET http://registry.test/hello HTTP/1.1\r\nHost: registry.test\r\nHost: registry.test\r\n"
     b"Connection: close\r\n\r\n", "HTTP/1.1 400"),
    (b"GET http://registry.test/hello HTTP/1.1\r\nHost: bad host!\r\nConnection: close\r\n\r\n",
     "HTTP/1.1 400"),
    (b"CONNECT registry.test:443 HTTP/1.1\r\n\r\n", "HTTP/1.1 400"),
    (b"GET http://registry.test/hello HTTP/1.0\r\n\r\n", "HTTP/1.1 200"),     # 1.0: optional
    (b"GET http://registry.test/hello HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", "HTTP/1.1 400"),
    (b"GET http://registry.test/hello HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
     "HTTP/1.1 200"),                                                          # empty: allowed
]


@pytest.mark.parametrize("head,expected", HOST_CASES)
async def test_host_field_rules(tmp_path, head, expected):
    async with running_gateway(make_settings(tmp_path, rules=RULES)) as gw:
        raw = await raw_request(gw.port, head)
    assert status_line(raw).startswith(expected), raw[:300]
    if expected.endswith("400"):
        assert gw.handler.exchanges == []


@pytest.mark.parametrize("head", [
    b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: registry.test\r\nHost: registry.test\r\n\r\n",
])
async def test_host_field_rules_inside_an_intercepted_connection(tmp_path, head):
    async with running_gateway(make_settings(tmp_path, rules=RULES)) as gw:
        reader, writer = await open_intercepted(gw)
        writer.write(head)
        async with asyncio.timeout(5):
            raw = await reader.read()
        writer.close()
    assert status_line(raw).startswith("HTTP/1.1 400"), raw[:300]
    assert gw.handler.exchanges == []


# -- D14: every error answer leaves an access-log line ------------------------------------------

@pytest.mark.parametrize("data,status", [
    (b"GET http://registry.test/hello HTTP/1.1\r\nHo", 408),
    (b"GET http://registry.test/ HTTP/1.1\r\nBad Header\r\n\r\n", 400),
    (b"GET http://registry.test/ HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
])
async def test_head_errors_leave_an_access_log_line(tmp_path, data, status):
    settings = make_settings(tmp_path, rules=RULES,
                             proxy={"header_timeout": 0.3, "max_header_bytes": 4096})
    with capture_logs() as logs:
        async with running_gateway(settings) as gw:
            raw = await raw_request(gw.port, data)
    assert status_line(raw).startswith(f"HTTP/1.1 {status}")
    lines = [e for e in logs if e.get("event") == "request"]
    assert [e["status"] for e in lines] == [status], lines
    assert lines[0]["error"] and lines[0]["client"].startswith("127.0.0.1:")


# -- D17: proxy-auth failures are rate-limited per client address --------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_limiter_window_lockout_and_reset():
    clock = FakeClock()
    limiter = FailureLimiter(3, window=60, lockout=30, clock=clock)
    assert limiter.failed("a") is None and limiter.failed("a") is None
    clock.now += 61                                   # the first two fell out of the window
    assert limiter.failed("a") is None and limiter.failed("a") is None
    assert limiter.locked_for("a") is None
    assert limiter.failed("a") == 30                  # third within the window: locked out
    assert limiter.locked_for("a") == 30 and limiter.locked_for("b") is None
    clock.now += 29.5
    assert limiter.locked_for("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.locked_for("a") is None            # the lockout is over
    limiter.failed("b")
    limiter.failed("b")
    limiter.succeeded("b")                            # a good password clears the count
    assert limiter.failed("b") is None
    assert FailureLimiter(0, 60, 60, clock).failed("c") is None   # 0: no limit


def test_failure_limiter_table_is_bounded():
    limiter = FailureLimiter(2, window=60, lockout=60, clock=FakeClock(), max_addresses=5)
    for i in range(50):
        limiter.failed(f"10.0.0.{i}")
        limiter.failed(f"10.1.0.{i}")
        limiter.failed(f"10.1.0.{i}")
    assert len(limiter._failures) <= 5 and len(limiter._locked) <= 5


async def test_wrong_proxy_passwords_lock_the_address_out(tmp_path):
    settings = make_settings(tmp_path, rules=RULES,
                             proxy={"auth": {"enabled": True, "username": "scanner",
                                             "max_failures": 3, "failure_window": "1m",
                                             "lockout": "2m"}})
    bad = base64.b64encode(b"scanner:wrong").decode()
    good = base64.b64encode(f"scanner:{PASSWORD}".encode()).decode()

    def connect(credential: str = "") -> bytes:
        auth = f"Proxy-Authorization: Basic {credential}\r\n" if credential else ""
        return (f"CONNECT registry.test:443 HTTP/1.1\r\nHost: registry.test:443\r\n{auth}"
                f"Connection: close\r\n\r\n").encode()

    async with running_gateway(settings) as gw:
        clock = FakeClock()
        gw.server.auth.failures.clock = clock
        for _ in range(5):                            # no credentials at all: not guesses
            assert status_line(await raw_request(gw.port, connect())).startswith("HTTP/1.1 407")
        for _ in range(3):
            assert status_line(await raw_request(gw.port, connect(bad))).startswith("HTTP/1.1 407")
        raw = await raw_request(gw.port, connect(good))    # locked: not even the right one
        assert status_line(raw).startswith("HTTP/1.1 429"), raw[:200]
        assert b"Retry-After: 120\r\n" in raw
        raw = await raw_request(gw.port, b"GET http://registry.test/hello HTTP/1.1\r\n"
                                         b"Host: registry.test\r\nConnection: close\r\n"
                                         + f"Proxy-Authorization: Basic {good}\r\n\r\n".encode())
        assert status_line(raw).startswith("HTTP/1.1 429")
        assert gw.metric("trivy_gateway_client_errors_total", reason="auth_locked_out") == 2
        clock.now += 121
        raw = await raw_request(gw.port, connect(good), read_until_close=False)
        assert status_line(raw) == "HTTP/1.1 200 Connection established"


# -- the client's body failures are typed (never mistaken for an upstream fault) -----------------

class BodyReadingHandler(MemoryHandler):
    """Reads the whole request body and records how that ended."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: list[str] = []
        self.done = asyncio.Event()

    async def handle(self, ex):
        self.exchanges.append(ex)
        try:
            async for _ in ex.body:
                pass
            self.outcomes.append("complete")
        except Exception as exc:  # noqa: BLE001 - the type is what the test looks at
            self.outcomes.append(type(exc).__name__)
            raise
        finally:
            self.done.set()
        return error_response(200, "read")


@pytest.mark.parametrize("data,hang_up", [
    (b"POST http://registry.test/x HTTP/1.1\r\nHost: registry.test\r\n"
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", False),      # bad framing
    (b"POST http://registry.test/x HTTP/1.1\r\nHost: registry.test\r\n"
     b"Content-Length: 1000000\r\n\r\n" + b"a" * 1000, True),                   # hang-up
])
async def test_client_body_failure_is_a_client_body_error(tmp_path, data, hang_up):
    handler = BodyReadingHandler()
    async with running_gateway(make_settings(tmp_path, rules=RULES), handler=handler) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(data)
        await writer.drain()
        if hang_up:
            writer.close()
        async with asyncio.timeout(10):
            await handler.done.wait()
        writer.close()
    assert handler.outcomes == ["ClientBodyError"]
    assert issubclass(ClientBodyError, Exception) and not issubclass(ClientBodyError, OSError)


# -- house: the mixin's and the body's requirements are Protocols the connection satisfies ------

async def test_client_connection_satisfies_the_protocols(tmp_path):
    from gateway.proxy.connection import ClientConnection
    from gateway.proxy.request import BodySource
    from gateway.proxy.respond import ResponseWriterHost

    async with running_gateway(make_settings(tmp_path, rules=RULES)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        await _wait_for(lambda: gw.server.active_connections == 1)
        conn = next(iter(gw.server._connections))
        assert isinstance(conn, ClientConnection)
        assert isinstance(conn, ResponseWriterHost) and isinstance(conn, BodySource)
        writer.close()
