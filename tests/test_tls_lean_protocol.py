"""The lean steps of ``LeanSSLProtocol`` (``gateway/proxy/tls_upgrade.py``) over real sockets.

The client side is an ``ssl.SSLObject`` over memory BIOs on a plain loopback socket, so each
test chooses where TLS records and TCP segments begin and end: several records in one segment,
one record over several segments, data and close_notify together, a write larger than the
socket's buffers while the client does not read. The server side is the gateway's
``start_tls`` with a protocol that records what reaches it.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import pytest

from gateway.proxy import tls_upgrade
from gateway.proxy.tls_upgrade import LeanSSLProtocol, start_tls
from tests.emulated.certs import create_pki

HOST = "registry.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return create_pki(tmp_path_factory.mktemp("lean-tls"), (HOST,))


class Recorder(asyncio.Protocol):
    """What the application side of the TLS connection sees."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.calls = 0
        self.eof = asyncio.Event()
        self.paused = 0
        self.resumed = 0
        self.arrived = asyncio.Event()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.calls += 1
        self.data += data
        self.arrived.set()

    def eof_received(self) -> bool:
        self.eof.set()
        return False

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1


class Client:
    """A TLS client whose records and segments the test places itself."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=HOST)
        self.loop = asyncio.get_running_loop()

    async def _pump_in(self) -> bool:
        data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), 10)
        if data:
            self.incoming.write(data)
        return bool(data)

    async def handshake(self) -> None:
        for _ in range(20):
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                await self._pump_in()
        await self.flush()

    async def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    def record(self, payload: bytes) -> bytes:
        """``payload`` as TLS record(s), not sent."""
        self.obj.write(payload)
        return self.outgoing.read()

    def close_notify(self) -> bytes:
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    async def read_all(self, n: int) -> bytes:
        got = bytearray()
        for _ in range(100_000):
            if len(got) >= n:
                break
            try:
                got += self.obj.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            if not await self._pump_in():
                break
        return bytes(got)


@contextlib.asynccontextmanager
async def connected(pki):
    """(client, server-side recorder, TLS transport, client socket); all closed afterwards."""
    loop = asyncio.get_running_loop()
    server_ctx = pki.server_ssl_context()
    made: asyncio.Future = loop.create_future()

    class Plain(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            made.set_result(transport)

    server = await loop.create_server(Plain, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    plain = await asyncio.wait_for(made, 10)
    recorder = Recorder()
    client = Client(sock, ssl.create_default_context(cafile=str(pki.ca_pem)))
    upgrade = asyncio.ensure_future(start_tls(loop, plain, recorder, server_ctx))
    await client.handshake()
    tls = await asyncio.wait_for(upgrade, 10)
    assert isinstance(tls._ssl_protocol, LeanSSLProtocol)
    try:
        yield client, recorder, tls, sock
    finally:
        tls.abort()
        sock.close()
        server.close()


async def _until(predicate, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_lean_steps_are_the_ones_running_here():
    # the suite runs on a Python the steps were written for: a test below that passes on the
    # stock steps would prove nothing about the lean ones
    assert tls_upgrade.LEAN_STEPS
    for name in ("_do_read__copied", "_write_appdata", "_process_outgoing",
                 "_control_ssl_reading"):
        assert name in LeanSSLProtocol.__dict__, name


async def test_records_in_one_segment_reach_the_protocol_at_once_and_in_order(pki):
    """Several records in one TCP segment: all of them are decrypted in the same callback
    (stopping after the first would leave the rest in the BIO until more bytes come)."""
    async with connected(pki) as (client, rec, tls, sock):
        parts = [b"GET /a HTTP/1.1\r\n\r\n", b"GET /b HTTP/1.1\r\n\r\n", b"x" * 40_000]
        wire = b"".join(client.record(p) for p in parts)
        await asyncio.get_running_loop().sock_sendall(sock, wire)
        await _until(lambda: len(rec.data) == sum(map(len, parts)), "all records")
        assert bytes(rec.data) == b"".join(parts)
        # nothing more is waiting, and the connection still works both ways
        tls.write(b"answer")
        assert await client.read_all(6) == b"answer"


async def test_a_record_split_over_segments_arrives_when_complete(pki):
    async with connected(pki) as (client, rec, tls, sock):
        loop = asyncio.get_running_loop()
        wire = client.record(b"GET /split HTTP/1.1\r\n\r\n")
        await loop.sock_sendall(sock, wire[:7])
        await asyncio.sleep(0.05)
        assert rec.data == b""                       # a partial record decrypts to nothing
        await loop.sock_sendall(sock, wire[7:])
        await _until(lambda: rec.data == b"GET /split HTTP/1.1\r\n\r\n", "the whole record")


async def test_data_and_close_notify_in_one_segment_give_the_data_then_eof(pki):
    """A read loop that stopped after the data record would not see the close_notify behind
    it until the client sent more, which it never will."""
    async with connected(pki) as (client, rec, tls, sock):
        wire = client.record(b"last request") + client.close_notify()
        await asyncio.get_running_loop().sock_sendall(sock, wire)
        await asyncio.wait_for(rec.eof.wait(), 10)
        assert rec.data == b"last request"


async def test_a_large_answer_to_a_client_that_does_not_read_pauses_then_resumes_writing(pki):
    """Flow control through the lean write step: the application is paused above the
    high-water mark and resumed once the client has read; every byte arrives in order."""
    async with connected(pki) as (client, rec, tls, sock):
        piece = bytes(range(256)) * 256              # 64 KiB per write
        sent = 0
        for i in range(1024):                        # at most 64 MiB
            tls.write(piece)
            sent += len(piece)
            if rec.paused:
                break
            await asyncio.sleep(0)
        # the socket's buffers filled, then the SSL protocol's: the application was told
        assert rec.paused == 1 and rec.resumed == 0
        body = piece * (sent // len(piece))
        got = await client.read_all(len(body))
        assert got == body
        await _until(lambda: rec.resumed >= 1, "resume_writing")
        assert tls.get_write_buffer_size() == 0


async def test_many_small_exchanges_keep_both_directions_in_step(pki):
    """Request, answer, request, answer… on one connection, as a kept-alive client does."""
    async with connected(pki) as (client, rec, tls, sock):
        loop = asyncio.get_running_loop()
        for i in range(200):
            request = b"GET /%d HTTP/1.1\r\n\r\n" % i
            rec.arrived.clear()
            before = len(rec.data)
            await loop.sock_sendall(sock, client.record(request))
            await _until(lambda: len(rec.data) == before + len(request), f"request {i}")
            assert bytes(rec.data[before:]) == request
            answer = b"answer %d" % i
            tls.write(answer)
            assert await client.read_all(len(answer)) == answer
        assert rec.calls == 200                      # one callback per request record
