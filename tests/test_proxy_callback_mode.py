"""The two schedulers of a client connection (docs/hit-path.md): answers known at once are
written in the protocol callback, everything else by the connection's task, and the client
sees one HTTP/1.1 connection either way: answers in request order, back-pressure honoured,
every request accounted once.

The handler answers ``/hit/<name>`` synchronously (``try_hit``, as the pipeline does for a
fresh in-memory hit) and everything else through ``handle`` (``tests/proxy_support.py``).
"""
from __future__ import annotations

import asyncio
from typing import Optional

from multidict import CIMultiDict

from gateway.exchange import BytesBody, Exchange, Response
from tests.proxy_support import (MemoryHandler, make_settings, open_intercepted,
                                 read_response, running_gateway)

RULES = [{"host": "registry.test", "action": "intercept"}]
BIG = 256 * 1024


class HitHandler(MemoryHandler):
    """``/hit/<name>``: answered without awaiting; ``/hit/big-<n>``: 256 KiB; ``/hit/raise``:
    try_hit raises (the request must still be answered, by ``handle``)."""

    def __init__(self) -> None:
        super().__init__()
        self.sync_answers = 0

    def try_hit(self, ex: Exchange) -> Optional[Response]:
        if not ex.path.startswith("/hit/"):
            return None
        name = ex.path[len("/hit/"):]
        if name == "raise":
            raise RuntimeError("try_hit failed (test)")
        self.sync_answers += 1
        return Response(200, CIMultiDict({"Content-Type": "text/plain"}),
                        BytesBody(_body(name)), source="cache")

    async def handle(self, ex: Exchange) -> Response:
        if ex.path == "/hit/raise":
            self.exchanges.append(ex)
            return Response(200, CIMultiDict(), BytesBody(b"answered by handle\n"))
        return await super().handle(ex)


def _body(name: str) -> bytes:
    if name.startswith("big-"):
        return name.encode().ljust(BIG, b".")
    return f"hit {name}\n".encode()


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: registry.test\r\n\r\n".encode()


async def _in_callback_mode(gw, reader, writer):
    """One request and its answer: then the connection waits in callback mode (no task)."""
    writer.write(_get("/hit/first"))
    async with asyncio.timeout(5):
        assert (await read_response(reader))[1] == b"hit first\n"
        conn = _connection(gw)
        while conn._task is not None:
            await asyncio.sleep(0.005)
    return conn


def _connection(gw):
    assert gw.server.active_connections == 1
    return next(iter(gw.server._connections))


async def test_pipelined_mix_of_hits_and_awaited_answers_comes_back_in_order(tmp_path):
    handler = HitHandler()
    async with running_gateway(make_settings(tmp_path, rules=RULES), handler=handler) as gw:
        reader, writer = await open_intercepted(gw)
        conn = await _in_callback_mode(gw, reader, writer)
        body = b"x" * 3000
        # one write: hits, a slow streamed answer, a POST with a body, a try_hit that raises
        burst = (_get("/hit/a") + _get("/slow/0.2") + _get("/hit/b")
                 + b"POST /echo HTTP/1.1\r\nHost: registry.test\r\nContent-Length: 3000\r\n\r\n"
                 + body + _get("/hit/raise") + _get("/hit/c"))
        writer.write(burst)
        got = []
        async with asyncio.timeout(10):
            for _ in range(6):
                got.append(await read_response(reader))
        assert [h.split(b"\r\n", 1)[0] for h, _ in got] == [b"HTTP/1.1 200 OK"] * 6
        assert got[0][1] == b"hit a\n"
        assert got[1][1] == b"x" * 1000 * 5
        assert got[2][1] == b"hit b\n"
        assert b'"body_bytes": 3000' in got[3][1]
        assert got[4][1] == b"answered by handle\n"
        assert got[5][1] == b"hit c\n"
        # the task handed the connection back: the next hit is answered in the callback again
        assert conn._task is None
        before = handler.sync_answers
        writer.write(_get("/hit/d"))
        async with asyncio.timeout(5):
            assert (await read_response(reader))[1] == b"hit d\n"
        assert handler.sync_answers == before + 1
        assert conn._task is None
        writer.close()
    # every request accounted exactly once (the request counter: the CONNECT and 8 requests)
    assert gw.metric("trivy_gateway_requests_total", host="registry.test", decision="intercept",
                     status="200", door="proxy") == 9
    # only what try_hit did not answer reached handle
    assert [ex.path for ex in handler.exchanges] == ["/slow/0.2", "/echo", "/hit/raise"]
    assert handler.sync_answers == 1 + 3 + 1


async def test_a_client_that_does_not_read_its_answers_is_not_buffered_without_bound(tmp_path):
    handler = HitHandler()
    async with running_gateway(make_settings(tmp_path, rules=RULES), handler=handler) as gw:
        reader, writer = await open_intercepted(gw)
        conn = await _in_callback_mode(gw, reader, writer)
        handler.sync_answers = 0
        count = 200                                  # 200 × 256 KiB = 50 MiB of answers
        writer.write(b"".join(_get(f"/hit/big-{i}") for i in range(count)))
        await writer.drain()
        # the gateway answers until the socket's buffers are full, then waits for the client
        async with asyncio.timeout(10):
            while conn._task is None or handler.sync_answers < 2:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        answered = handler.sync_answers
        buffered = conn.stream.transport.get_write_buffer_size()
        assert answered < count / 2, answered
        assert buffered < 4 * BIG, buffered
        # nothing was lost: every answer arrives, whole and in order, once the client reads
        async with asyncio.timeout(30):
            for i in range(count):
                head, data = await read_response(reader)
                assert head.startswith(b"HTTP/1.1 200 OK") and data == _body(f"big-{i}"), i
        assert handler.sync_answers == count
        writer.close()


async def test_an_idle_connection_between_hits_is_closed_after_the_idle_timeout(tmp_path):
    settings = make_settings(tmp_path, rules=RULES, proxy={"idle_timeout": 0.3})
    async with running_gateway(settings, handler=HitHandler()) as gw:
        reader, writer = await open_intercepted(gw)
        writer.write(_get("/hit/a"))
        async with asyncio.timeout(5):
            assert (await read_response(reader))[1] == b"hit a\n"
            assert await reader.read() == b""        # closed by the gateway, quietly
        writer.close()
        async with asyncio.timeout(5):
            while gw.server.active_connections:
                await asyncio.sleep(0.01)


async def test_a_closed_connection_is_freed_without_waiting_for_the_cycle_collector(tmp_path):
    """The stream's callbacks are bound methods of the connection: a closed connection must
    drop them, or every closed connection (and the ~20 KiB of TLS state its stream holds)
    waits for a full garbage collection."""
    import gc
    import weakref

    async with running_gateway(make_settings(tmp_path, rules=RULES), handler=HitHandler()) as gw:
        reader, writer = await open_intercepted(gw)
        conn = await _in_callback_mode(gw, reader, writer)
        refs = [weakref.ref(conn), weakref.ref(conn.stream)]
        del conn
        gc.disable()
        try:
            writer.close()
            async with asyncio.timeout(5):
                while gw.server.active_connections:
                    await asyncio.sleep(0.005)
                while any(r() is not None for r in refs):
                    await asyncio.sleep(0.005)      # the transport lets go on its next turn
        finally:
            gc.enable()
