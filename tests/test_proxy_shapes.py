"""Request shapes (``gateway/proxy/shapes.py``): a head that arrives again, byte for byte, on an
intercepted connection is answered from what parsing and routing made of it the first times —
and the client, the handler, the metrics and the access log cannot tell the difference.

Real sockets and real TLS through ``CONNECT`` (``tests/proxy_support.py``); the handler answers
``/hit/<name>`` synchronously (``try_hit``, as the pipeline does for a fresh in-memory hit) and
records every exchange it is given.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Optional

import pytest
from multidict import CIMultiDict
from structlog.testing import capture_logs

from gateway.exchange import BytesBody, Exchange, Response
from gateway.proxy import http1
from tests.proxy_support import (MemoryHandler, make_settings, open_intercepted,
                                 read_response, running_gateway)

RULES = [{"host": "registry.test", "action": "intercept"},
         {"host": "other.test", "action": "intercept"}]


class RecordingHandler(MemoryHandler):
    """``/hit/<name>`` answered by ``try_hit`` while ``self.known`` (else by ``handle``); every
    exchange either method sees is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.known = True
        self.tried: list[Exchange] = []
        self.handled: list[Exchange] = []

    def try_hit(self, ex: Exchange) -> Optional[Response]:
        self.tried.append(ex)
        if not ex.path.startswith("/hit/") or not self.known:
            return None
        return Response(200, CIMultiDict({"Content-Type": "text/plain"}),
                        BytesBody(f"hit {ex.path[5:]} {ex.headers.get('X-Flavour', '-')}\n"
                                  .encode()), source="cache")

    async def handle(self, ex: Exchange) -> Response:
        self.handled.append(ex)
        return Response(200, CIMultiDict({"Content-Type": "text/plain"}),
                        BytesBody(f"handled {ex.path}\n".encode()))


def _get(path: str, host: str = "registry.test", extra: str = "", method: str = "GET") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Go-http-client/1.1\r\n"
            f"{extra}\r\n").encode()


async def _ask(reader, writer, data: bytes) -> tuple[bytes, bytes]:
    writer.write(data)
    async with asyncio.timeout(5):
        return await read_response(reader)


async def _open(gw, host: str = "registry.test"):
    """An intercepted connection that has answered one request and waits in callback mode
    (the first request after the handshake may still be read by the CONNECT's task)."""
    reader, writer = await open_intercepted(gw, host)
    await _ask(reader, writer, _get("/warm-up", host=host))
    conn = next(c for c in gw.server._connections if c.tls_host == host)  # noqa: SLF001
    async with asyncio.timeout(5):
        while conn._task is not None:                                      # noqa: SLF001
            await asyncio.sleep(0.005)
    return reader, writer


def _memo(gw, host: str = "registry.test"):
    return gw.server._shapes[(host, 443)]      # noqa: SLF001 - what the memo holds


async def test_a_head_seen_again_is_answered_as_parsing_it_would_be(tmp_path):
    handler = RecordingHandler()
    with capture_logs() as logs:
        async with running_gateway(make_settings(tmp_path, rules=RULES), handler=handler) as gw:
            reader, writer = await _open(gw)
            request = _get("/hit/pom", extra="Accept: */*\r\n")
            answers = [await _ask(reader, writer, request) for _ in range(4)]
            # recorded on its second arrival, replayed from the third on
            assert list(_memo(gw).shapes) == [request]
            writer.close()
    heads = [h for h, _ in answers]
    assert [b for _, b in answers] == [b"hit pom -\n"] * 4
    assert all(h == heads[0] for h in heads)
    # what the handler was given: the same request every time, a new exchange each time
    tried = [ex for ex in handler.tried if ex.path == "/hit/pom"]
    assert len(tried) == 4 and [ex.path for ex in handler.handled] == ["/warm-up"]
    assert [ex.shape is not None for ex in tried] == [False, False, True, True]
    for ex in tried:
        assert (ex.method, ex.scheme, ex.host, ex.port, ex.target) == (
            "GET", "https", "registry.test", 443, "/hit/pom")
        assert list(ex.headers.items()) == list(tried[0].headers.items())
        assert ex.notes["decision"] == "intercept"
    assert len({ex.id for ex in tried}) == 4
    # a replayed request's fields are shared with the others of its shape: read-only
    with pytest.raises(TypeError):
        tried[3].headers["X-Mine"] = "1"        # type: ignore[index]
    # accounted once each, with the same record
    access = [e for e in logs if e.get("event") == "request" and e.get("path") == "/hit/pom"]
    assert len(access) == 4 and len({e["request_id"] for e in access}) == 4
    keep = ("client", "method", "scheme", "host", "port", "path", "status", "bytes", "decision",
            "door")
    assert all({k: e[k] for k in keep} == {k: access[0][k] for k in keep} for e in access)
    assert gw.metric("trivy_gateway_requests_total", host="registry.test", decision="intercept",
                     status="200", door="proxy") == 6    # the CONNECT, the warm-up, 4 requests


async def test_a_head_that_differs_in_one_byte_is_routed_on_its_own(tmp_path):
    handler = RecordingHandler()
    async with running_gateway(make_settings(tmp_path, rules=RULES), handler=handler) as gw:
        reader, writer = await _open(gw)
        for _ in range(3):
            await _ask(reader, writer, _get("/hit/pom", extra="X-Flavour: a\r\n"))
        _, body = await _ask(reader, writer, _get("/hit/pom", extra="X-Flavour: b\r\n"))
        assert body == b"hit pom b\n"
        assert handler.tried[-1].shape is None
        assert handler.tried[-1].headers["X-Flavour"] == "b"
        assert handler.tried[-2].shape is not None      # the "a" flavour was replayed
        writer.close()


async def test_shapes_belong_to_one_connect_authority(tmp_path):
    """The same bytes on a connection CONNECTed to another host are that connection's request:
    a Host naming another authority is refused (421), never answered from another memo."""
    handler = RecordingHandler()
    async with running_gateway(make_settings(tmp_path, rules=RULES), handler=handler) as gw:
        reader, writer = await _open(gw)
        request = _get("/hit/pom")
        for _ in range(3):
            await _ask(reader, writer, request)
        other_reader, other_writer = await _open(gw, "other.test")
        head, _ = await _ask(other_reader, other_writer, request)
        assert head.startswith(b"HTTP/1.1 421 ")
        assert [ex.path for ex in handler.tried].count("/hit/pom") == 3
        for w in (writer, other_writer):
            w.close()


async def test_a_replayed_request_the_handler_cannot_answer_at_once_goes_to_handle(tmp_path):
    """What was a fresh hit when the shape was recorded may be a miss now (expired, purged):
    the replayed request is handed to the task like a parsed one, and the connection goes on."""
    handler = RecordingHandler()
    async with running_gateway(make_settings(tmp_path, rules=RULES), handler=handler) as gw:
        reader, writer = await _open(gw)
        request = _get("/hit/pom")
        for _ in range(3):
            assert (await _ask(reader, writer, request))[1] == b"hit pom -\n"
        handler.known = False
        _, body = await _ask(reader, writer, request)
        assert body == b"handled /hit/pom\n"
        assert handler.handled[-1].shape is not None      # it was a replay
        # the handler may keep the exchange's fields (a fill sends them upstream): unchanged
        first = next(ex for ex in handler.tried if ex.path == "/hit/pom")
        assert list(handler.handled[-1].headers.items()) == list(first.headers.items())
        handler.known = True
        assert (await _ask(reader, writer, request))[1] == b"hit pom -\n"
        writer.close()


async def test_pipelined_requests_in_one_chunk_are_answered_and_not_remembered(tmp_path):
    handler = RecordingHandler()
    async with running_gateway(make_settings(tmp_path, rules=RULES), handler=handler) as gw:
        reader, writer = await _open(gw)
        pair = _get("/hit/a") + _get("/hit/b")
        for _ in range(3):
            writer.write(pair)
            async with asyncio.timeout(5):
                assert (await read_response(reader))[1] == b"hit a -\n"
                assert (await read_response(reader))[1] == b"hit b -\n"
        assert list(_memo(gw).shapes) in ([], [_get("/warm-up")])
        assert all(ex.shape is None for ex in handler.tried if ex.path != "/warm-up")
        writer.close()


async def test_a_replayed_head_keeps_its_framing_head_and_connection_close(tmp_path):
    handler = RecordingHandler()
    async with running_gateway(make_settings(tmp_path, rules=RULES), handler=handler) as gw:
        reader, writer = await _open(gw)
        head_request = _get("/hit/pom", method="HEAD")
        for _ in range(3):
            writer.write(head_request)
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            assert b"content-length: 10\r\n" in head.lower()     # "hit pom -\n", not sent
        writer.write(_get("/hit/after"))                        # nothing was sent for HEAD
        async with asyncio.timeout(5):
            assert (await read_response(reader))[1] == b"hit after -\n"
        heads = [ex for ex in handler.tried if ex.method == "HEAD"]
        assert [ex.shape is not None for ex in heads] == [False, False, True]
        writer.close()
        # Connection: close on every arrival: each on its own connection, the third replayed
        closing = _get("/hit/last", extra="Connection: close\r\n")
        for n in range(3):
            r, w = await _open(gw)
            head, body = await _ask(r, w, closing)
            assert b"connection: close" in head.lower() and body == b"hit last -\n"
            async with asyncio.timeout(5):
                assert await r.read() == b""                    # the gateway closed it
            w.close()
        assert handler.tried[-1].shape is not None


def test_shape_memos_follow_the_connections_settings(tmp_path):
    """A reload gives new connections new proxy settings, and them a new memo; a connection
    keeps the memo of the settings it was created with."""
    from tests.proxy_support import Gateway
    gw = Gateway(make_settings(tmp_path, rules=RULES))
    first = gw.server.shapes_for("registry.test", 443, gw.settings.proxy)
    assert gw.server.shapes_for("registry.test", 443, gw.settings.proxy) is first
    reloaded = make_settings(tmp_path, rules=RULES)
    assert reloaded.proxy is not gw.settings.proxy
    assert gw.server.shapes_for("registry.test", 443, reloaded.proxy) is not first
    assert gw.server.shapes_for("other.test", 443, gw.settings.proxy) is not first


@pytest.mark.parametrize("raw", [
    b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n",
    b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"GET /a HTTP/1.0\r\nHost: h\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n",
])
def test_replaying_a_head_makes_the_transitions_parsing_it_makes(raw):
    """``ServerConnection.replay`` at rest leaves the machine exactly where feeding the same
    bytes does (the state the response framing and keep-alive are decided from)."""
    def state(c: http1.ServerConnection) -> tuple:
        return (c.their_state, c.our_state, c._request_keep_alive, c._http10,  # noqa: SLF001
                c._head_request, c._connect, c.they_are_waiting_for_100_continue,  # noqa: SLF001
                c.trailing_data, c.at_rest)

    parsed = http1.ServerConnection()
    parsed.receive_data(raw)
    head = parsed.next_event()
    assert type(head) is http1.RequestHead and parsed.next_event() is http1.END
    replayed = http1.ServerConnection()
    assert replayed.at_rest
    assert replayed.replay(head) is True
    assert state(replayed) == state(parsed)
    # and the response side behaves the same
    for c in (parsed, replayed):
        c.start_response(200, b"OK", b"", length=0)
        c.end_response()
    assert state(replayed) == state(parsed)
    # never in the middle of something: declined, nothing changed
    busy = http1.ServerConnection()
    busy.receive_data(b"GET /a HTTP/1.1\r\n")
    before = state(busy)
    assert busy.replay(head) is False and state(busy) == before
    # and never a head that switches protocols
    connect = http1.ServerConnection()
    connect.receive_data(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n")
    switch = connect.next_event()
    with pytest.raises(http1.LocalProtocolError):
        http1.ServerConnection().replay(switch)


class SharedAnswerHandler(MemoryHandler):
    """Answers every ``/hit/…`` request with ONE Response object, pre-rendered, as the
    pipeline shares a hit's answer for its Age second."""

    def __init__(self) -> None:
        super().__init__()
        body = b"shared answer\n"
        self.answer = Response(200, CIMultiDict({"Content-Type": "text/plain", "ETag": '"s"'}),
                               BytesBody(body), source="cache",
                               head=b'Content-Type: text/plain\r\nETag: "s"\r\n')

    def try_hit(self, ex: Exchange) -> Optional[Response]:
        return self.answer if ex.path.startswith("/hit/") else None


async def test_a_shared_answer_is_written_as_rendering_it_would_be_for_each_request(tmp_path):
    """The bytes written for a shared answer are kept on it (``Response.wire``) and reused only
    for a request with the same framing inputs: a kept-alive GET. A HEAD, a request that asks
    to close, and a connection of a draining gateway get their own framing."""
    handler = SharedAnswerHandler()
    async with running_gateway(make_settings(tmp_path, rules=RULES), handler=handler) as gw:
        reader, writer = await _open(gw)
        first = await _ask(reader, writer, _get("/hit/a"))
        assert handler.answer.wire is not None
        # an answer made from this one with other fields (the mirror door drops some) starts
        # without the bytes written for these
        assert dataclasses.replace(handler.answer, head=None).wire is None
        other_reader, other_writer = await _open(gw)
        again = await _ask(other_reader, other_writer, _get("/hit/b"))
        assert again == first and first[1] == b"shared answer\n"
        assert b"content-length: 14\r\n" in first[0].lower()
        assert b"connection: close" not in first[0].lower()
        # HEAD: the same head, no body
        writer.write(_get("/hit/a", method="HEAD"))
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head == first[0]
        # and the connection is still in step: the next answer is whole
        assert await _ask(reader, writer, _get("/hit/c")) == first
        # Connection: close → its own framing, and the connection ends
        closing = await _ask(reader, writer, _get("/hit/d", extra="Connection: close\r\n"))
        assert b"connection: close" in closing[0].lower() and closing[1] == first[1]
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        # a draining gateway closes after the answer, memo or not
        gw.server.draining = True
        drained = await _ask(other_reader, other_writer, _get("/hit/e"))
        assert b"connection: close" in drained[0].lower() and drained[1] == first[1]
        for w in (writer, other_writer):
            w.close()


def test_replaying_a_response_makes_the_transitions_framing_it_makes():
    """``ServerConnection.replay_response`` after a kept-alive request: the state framing the
    same response by length leaves; refused for a request that is not a kept-alive GET."""
    def state(c: http1.ServerConnection) -> tuple:
        return (c.their_state, c.our_state, c._response_keep_alive, c._no_body,  # noqa: SLF001
                c._remaining, c._chunked, c.they_are_waiting_for_100_continue)  # noqa: SLF001

    framed, replayed = http1.ServerConnection(), http1.ServerConnection()
    for c in (framed, replayed):
        c.receive_data(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
        assert type(c.next_event()) is http1.RequestHead and c.next_event() is http1.END
        assert c.plain_keep_alive
    framed.start_response(200, b"OK", b"", length=3)
    framed.send_data(b"abc")
    framed.end_response()
    assert replayed.replay_response() is True
    assert state(replayed) == state(framed)
    for c in (framed, replayed):
        c.start_next_cycle()
    for raw in (b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\n",
                b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                b"GET /a HTTP/1.0\r\nHost: h\r\n\r\n"):
        c = http1.ServerConnection()
        c.receive_data(raw)
        c.next_event(), c.next_event()
        assert not c.plain_keep_alive
        before = state(c)
        assert c.replay_response() is False and state(c) == before


def test_the_shapes_of_a_server_are_bounded_together(monkeypatch):
    """All memos of a server hold at most SHAPES_MAX shapes together: reaching it starts them
    all over; a memo replaced after a reload gives its share back."""
    from gateway.proxy import shapes as shapes_module
    from gateway.proxy.request import AccessRecord, RequestFields
    from gateway.proxy.routing import Prepared

    monkeypatch.setattr(shapes_module, "SHAPES_MAX", 4)

    def prepared(path: str) -> tuple[http1.RequestHead, Prepared]:
        head = http1.RequestHead("GET", path, [("Host", "h")], "1.1", True)
        rec = AccessRecord.of("c", "GET", 0.0, scheme="https", host="h", port=443, path=path,
                           decision="intercept")
        ex = Exchange("GET", "https", "h", 443, path, CIMultiDict(Host="h"), None, "c")
        return head, Prepared(rec, RequestFields(head.headers), ex)

    budget = shapes_module.ShapeBudget()
    a, b = budget.memo(object()), budget.memo(object())
    for memo, paths in ((a, ["/1", "/2"]), (b, ["/3", "/4"])):
        for path in paths:
            for _ in range(2):                   # remembered on the second arrival
                memo.record(path.encode(), *prepared(path))
    assert (len(a.shapes), len(b.shapes), budget.held) == (2, 2, 4)
    a.record(b"/5", *prepared("/5"))
    a.record(b"/5", *prepared("/5"))             # the fifth: everything starts over
    assert (list(a.shapes), b.shapes, budget.held) == ([b"/5"], {}, 1)
    budget.retire(a)
    assert budget.held == 0 and budget.memos == [b]


async def test_an_intercepted_connection_keeps_its_attributes_in_a_shared_key_dict(tmp_path):
    """At most 29 instance attributes (CPython 3.11 shares an instance dict's keys only up to
    a small size): a 30th made every idle intercepted connection ~1.2 KiB larger."""
    async with running_gateway(make_settings(tmp_path, rules=RULES),
                               handler=RecordingHandler()) as gw:
        reader, writer = await _open(gw)
        for _ in range(3):
            await _ask(reader, writer, _get("/hit/pom"))         # a replay has happened too
        conn = next(iter(gw.server._connections))                 # noqa: SLF001
        assert len(vars(conn)) <= 29, sorted(vars(conn))
        writer.close()
