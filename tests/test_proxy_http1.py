"""The HTTP/1.1 server state machine (gateway/proxy/http1.py), without sockets: bytes in, events
out, framing bytes out. The proxy tests drive the same code over real connections."""
from __future__ import annotations

import pytest

from gateway.proxy import http1
from gateway.proxy.http1 import (CLOSED, DONE, END, IDLE, MUST_CLOSE, NEED_DATA, SEND_BODY,
                                 SWITCHED, Data, LocalProtocolError, RemoteProtocolError,
                                 RequestHead, ServerConnection)


def events(conn: ServerConnection, limit: int = 100) -> list:
    """Pull events until NEED_DATA / CLOSED (bounded)."""
    out = []
    for _ in range(limit):
        ev = conn.next_event()
        out.append(ev)
        if ev is NEED_DATA or ev is CLOSED:
            return out
    raise AssertionError("no NEED_DATA within the bound")


def test_simple_get_and_keep_alive_cycle():
    c = ServerConnection()
    c.receive_data(b"GET /a?b=1 HTTP/1.1\r\nHost: x.test\r\nAccept: */*\r\n\r\n")
    head = c.next_event()
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.http_version) == ("GET", "/a?b=1", "1.1")
    assert head.headers == [("Host", "x.test"), ("Accept", "*/*")]
    assert head.keep_alive and not head.upgrade
    assert c.next_event() is END
    assert c.their_state is DONE
    out = c.start_response(200, b"OK", b"X-A: 1\r\n", length=5)
    assert out == b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n"
    assert c.send_data(b"hello") == [b"hello"]
    assert c.end_response() == b""
    assert c.our_state is DONE
    c.start_next_cycle()
    assert (c.our_state, c.their_state) == (IDLE, IDLE)
    assert c.next_event() is NEED_DATA
    c.receive_data(b"")
    assert c.next_event() is CLOSED


def test_head_split_across_reads():
    c = ServerConnection()
    for piece in (b"GE", b"T / HTTP/1.1\r\nHo", b"st: a\r", b"\n\r\n"):
        assert c.next_event() is NEED_DATA
        c.receive_data(piece)
    assert isinstance(c.next_event(), RequestHead)
    assert c.next_event() is END


def test_pipelined_requests_wait_for_the_next_cycle():
    c = ServerConnection()
    c.receive_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.next_event().target == "/1"
    assert c.next_event() is END
    assert c.next_event() is NEED_DATA           # /2 is held until the response is done
    assert c.trailing_data[0]                   # ... but it is known to be buffered
    c.start_response(204, b"No Content", b"", length=None)
    c.end_response()
    c.start_next_cycle()
    assert c.next_event().target == "/2"


def test_content_length_body_and_chunked_body():
    c = ServerConnection()
    c.receive_data(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel")
    assert isinstance(c.next_event(), RequestHead)
    ev = c.next_event()
    assert isinstance(ev, Data) and ev.data == b"hel"
    assert c.next_event() is NEED_DATA and c.their_state is SEND_BODY
    c.receive_data(b"lo")
    assert c.next_event().data == b"lo"
    assert c.next_event() is END

    c = ServerConnection()
    c.receive_data(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")
    head = c.next_event()
    assert ("X-Trailer", "t") not in head.headers
    got = b""
    for ev in events(c)[:-1]:
        if isinstance(ev, Data):
            got += ev.data
    assert got == b"abcde"
    assert c.their_state is DONE


@pytest.mark.parametrize("raw,status", [
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),                         # space before colon
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),               # obs-fold
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: a\n\n", 400),                                 # bare LF
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),     # complete, too big
], ids=["ws-colon", "obs-fold", "dup-cl", "cl-te", "bare-lf", "garbage", "http2", "nul", "431"])
def test_bad_requests_raise_with_status(raw, status):
    c = ServerConnection(max_head_bytes=64 * 1024)
    c.receive_data(raw)
    with pytest.raises(RemoteProtocolError) as info:
        events(c)
    assert info.value.error_status_hint == status


def test_incomplete_head_is_bounded():
    c = ServerConnection(max_head_bytes=1000)
    c.receive_data(b"GET / HTTP/1.1\r\nX: " + b"a" * 600)
    assert c.next_event() is NEED_DATA
    c.receive_data(b"a" * 600)                   # still no end of head, > 1000 bytes in total
    with pytest.raises(RemoteProtocolError) as info:
        c.next_event()
    assert info.value.error_status_hint == 431


def test_error_after_a_good_pipelined_request_surfaces_in_order():
    c = ServerConnection()
    c.receive_data(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nBROKEN REQUEST\r\n\r\n")
    assert c.next_event().target == "/ok"        # the good one is still served
    assert c.next_event() is END
    c.start_response(200, b"OK", b"", length=0)
    c.end_response()
    c.start_next_cycle()
    with pytest.raises(RemoteProtocolError):
        c.next_event()


def test_eof_in_the_middle_of_a_request():
    c = ServerConnection()
    c.receive_data(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    events(c)
    c.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        c.next_event()
    assert c.trailing_data[1] is True


def test_connect_keeps_the_bytes_after_its_head():
    c = ServerConnection()
    c.receive_data(b"CONNECT reg.test:443 HTTP/1.1\r\nHost: reg.test:443\r\n\r\n\x16\x03\x01")
    head = c.next_event()
    assert head.method == "CONNECT" and head.target == "reg.test:443" and head.upgrade
    assert c.next_event() is END
    assert c.their_state is SWITCHED
    assert c.trailing_data == (b"\x16\x03\x01", False)
    c.receive_data(b"more")                      # never parsed as HTTP
    assert c.trailing_data[0] == b"\x16\x03\x01more"
    assert c.accept_connect() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert c.our_state is SWITCHED


def test_refused_connect_closes():
    c = ServerConnection()
    c.receive_data(b"CONNECT reg.test:443 HTTP/1.1\r\n\r\n")
    events(c)
    c.start_response(403, b"Forbidden", b"", length=3, close=True)
    c.send_data(b"no\n")
    c.end_response()
    assert c.our_state is MUST_CLOSE
    with pytest.raises(LocalProtocolError):
        c.start_next_cycle()


def test_upgrade_request_is_served_plain_then_closed():
    c = ServerConnection()
    c.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    head = c.next_event()
    assert head.upgrade and c.next_event() is END
    assert c.their_state is MUST_CLOSE
    out = c.start_response(200, b"OK", b"", length=0)
    assert b"Connection: close\r\n" in out

    c = ServerConnection()
    c.receive_data(b"POST / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                   b"Content-Length: 3\r\n\r\nabc")
    with pytest.raises(RemoteProtocolError):
        c.next_event()


@pytest.mark.parametrize("request_line,headers,keep", [
    (b"GET / HTTP/1.1", b"", True),
    (b"GET / HTTP/1.1", b"Connection: close\r\n", False),
    (b"GET / HTTP/1.0", b"", False),
    (b"GET / HTTP/1.0", b"Connection: keep-alive\r\n", False),   # HTTP/1.0: always closed
])
def test_keep_alive_decisions(request_line, headers, keep):
    c = ServerConnection()
    c.receive_data(request_line + b"\r\nHost: a\r\n" + headers + b"\r\n")
    assert c.next_event().keep_alive is keep
    c.next_event()
    out = c.start_response(200, b"OK", b"", length=2)
    assert (b"Connection: close\r\n" in out) is (not keep)
    c.send_data(b"ok")
    c.end_response()
    assert c.our_state is (DONE if keep else MUST_CLOSE)


def test_unknown_length_is_chunked_for_11_and_close_delimited_for_10():
    c = ServerConnection()
    c.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    events(c)
    out = c.start_response(200, b"OK", b"", length=None)
    assert b"Transfer-Encoding: chunked\r\n" in out
    assert c.send_data(b"abc") == [b"3\r\n", b"abc", b"\r\n"]
    assert c.send_data(b"") == []
    assert c.frame_region(16) == (b"10\r\n", b"\r\n")
    assert c.end_response() == b"0\r\n\r\n"
    assert c.our_state is DONE

    c = ServerConnection()
    c.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    events(c)
    out = c.start_response(200, b"OK", b"", length=None)
    assert b"Transfer-Encoding" not in out and b"Connection: close\r\n" in out
    assert c.send_data(b"abc") == [b"abc"]
    assert c.end_response() == b""
    assert c.our_state is MUST_CLOSE


def test_body_must_match_content_length():
    c = ServerConnection()
    c.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    events(c)
    c.start_response(200, b"OK", b"", length=4)
    c.send_data(b"abc")
    with pytest.raises(LocalProtocolError):
        c.end_response()                         # one byte short: never looks complete

    c = ServerConnection()
    c.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    events(c)
    c.start_response(200, b"OK", b"", length=2)
    with pytest.raises(LocalProtocolError):
        c.send_data(b"abc")                      # longer than declared


@pytest.mark.parametrize("method,status,length,expect_cl", [
    ("HEAD", 200, 1234, b"Content-Length: 1234\r\n"),
    ("HEAD", 200, None, b""),
    ("GET", 304, 99, b"Content-Length: 99\r\n"),
    ("GET", 304, None, b""),
    ("GET", 204, 5, b""),
])
def test_bodyless_responses(method, status, length, expect_cl):
    c = ServerConnection()
    c.receive_data(f"{method} / HTTP/1.1\r\n\r\n".encode())
    events(c)
    out = c.start_response(status, b"X", b"", length=length)
    assert out == b"HTTP/1.1 %d X\r\n%s\r\n" % (status, expect_cl)
    with pytest.raises(LocalProtocolError):
        c.send_data(b"x")
    assert c.end_response() == b""
    assert c.our_state is DONE


def test_expect_100_continue():
    c = ServerConnection()
    c.receive_data(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    c.next_event()
    assert c.they_are_waiting_for_100_continue
    assert c.informational(100, b"Continue") == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert not c.they_are_waiting_for_100_continue
    c.receive_data(b"ok")
    assert c.next_event().data == b"ok"
    assert c.next_event() is END

    c = ServerConnection()                       # a final response also ends the wait
    c.receive_data(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    c.next_event()
    c.start_response(417, b"Expectation Failed", b"", length=0, close=True)
    assert not c.they_are_waiting_for_100_continue


def test_response_state_errors():
    c = ServerConnection()
    with pytest.raises(LocalProtocolError):
        c.end_response()
    with pytest.raises(LocalProtocolError):
        c.accept_connect()                       # no CONNECT received
    c.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    events(c)
    with pytest.raises(LocalProtocolError):
        c.start_response(100, b"Continue", b"", length=None)    # 1xx is not final
    c.start_response(200, b"OK", b"", length=0)
    with pytest.raises(LocalProtocolError):
        c.start_response(200, b"OK", b"", length=0)             # twice




def _drain_all(c: ServerConnection) -> list:
    """Every event of a pipelined stream, answering each request as the proxy would."""
    out: list = []
    for _ in range(1000):
        ev = c.next_event()
        if ev is CLOSED:
            return out
        if ev is NEED_DATA:
            if c.their_state is DONE:
                c.start_response(204, b"No Content", b"", length=None)
                c.end_response()
                c.start_next_cycle()
                continue
            return out
        out.append((type(ev).__name__, getattr(ev, "target", None),
                    getattr(ev, "data", None) or tuple(getattr(ev, "headers", ()))))
    raise AssertionError("unbounded")


def test_random_splits_give_the_same_events():
    """The same pipelined bytes, cut at random points (fixed seed, bounded), give the same
    events as in one piece: no state depends on where reads happen to end."""
    import random
    stream = (b"GET /a HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
              b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world"
              b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
              b"HEAD /d HTTP/1.1\r\nHost: x\r\n\r\n")

    def norm(events):                            # body pieces may arrive split differently
        merged: list = []
        for name, target, data in events:
            if name == "Data" and merged and merged[-1][0] == "Data":
                merged[-1] = ("Data", None, merged[-1][2] + data)
            else:
                merged.append((name, target, data))
        return merged

    whole = ServerConnection()
    whole.receive_data(stream)
    expected = norm(_drain_all(whole))
    assert [e[1] for e in expected if e[0] == "RequestHead"] == ["/a", "/b", "/c", "/d"]
    assert [e[2] for e in expected if e[0] == "Data"] == [b"hello world", b"hello world"]
    assert expected[0][2] == (("Host", "x"), ("Accept", "*/*"))
    rng = random.Random(20261122)
    for _ in range(300):
        c = ServerConnection(max_head_bytes=200)
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 12)))
        got: list = []
        for lo, hi in zip([0, *cuts], [*cuts, len(stream)]):
            c.receive_data(stream[lo:hi])
            got += _drain_all(c)
        assert norm(got) == expected, cuts


def test_mutated_and_random_input_only_ever_raises_remote_protocol_error():
    """Bounded fuzzing (seeded): valid requests with bytes flipped, inserted or dropped, and
    plain noise, fed in random pieces. The machine either yields events or raises
    RemoteProtocolError; never another exception, never an endless loop."""
    import random
    rng = random.Random(1122)
    base = [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"CONNECT reg.test:443 HTTP/1.1\r\nHost: reg.test:443\r\n\r\n\x16\x03\x01"]
    outcomes = {"events": 0, "error": 0}
    for _ in range(600):
        if rng.random() < 0.2:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
        else:
            data = bytearray(b"".join(rng.sample(base, rng.randint(1, 3))))
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(data))
                op = rng.random()
                if op < 0.4:
                    data[i] = rng.randrange(256)
                elif op < 0.7:
                    data.insert(i, rng.randrange(256))
                else:
                    del data[i]
            data = bytes(data)
        c = ServerConnection(max_head_bytes=512)
        try:
            pos = 0
            while pos < len(data):
                step = rng.randint(1, 40)
                c.receive_data(data[pos:pos + step])
                pos += step
                _drain_all(c)
            c.receive_data(b"")
            _drain_all(c)
            outcomes["events"] += 1
        except RemoteProtocolError as exc:
            assert 400 <= exc.error_status_hint < 600
            outcomes["error"] += 1
    assert outcomes["events"] > 50 and outcomes["error"] > 50, outcomes
