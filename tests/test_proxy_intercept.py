"""CONNECT interception, absolute-form requests and the HTTP/1.1 details, over real sockets + TLS.

Clients: aiohttp (proxy=..., ssl context trusting only the gateway CA), curl --proxy --cacert,
and raw sockets for what well-behaved clients never send.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.exchange import FileBody

from proxy_support import (PASSWORD, MemoryHandler, make_settings, raw_request, running_gateway,
                           status_line)

RULES = [
    {"host": "registry.test", "action": "intercept"},
    {"host": "*.cdn.test", "action": "intercept"},
    {"host": "check.trivy.dev", "action": "deny",
     "reason": "version check and telemetry are disabled by the gateway (policy.rules: check.trivy.dev)"},
]


def client_ssl(ca_path: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_path)     # trusts the gateway CA only
    return ctx


async def curl(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec("curl", "-sS", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode("latin-1"), err.decode("latin-1")


@pytest.fixture
async def gw(tmp_path):
    async with running_gateway(make_settings(tmp_path, rules=RULES)) as gateway:
        yield gateway


async def test_intercept_keepalive_many_requests_on_one_tls_connection(gw):
    connector = aiohttp.TCPConnector(limit=1)
    ctx = client_ssl(gw.ca_path)          # one context: aiohttp pools connections per context
    async with aiohttp.ClientSession(connector=connector) as session:
        bodies = []
        for path in ("/hello", "/echo?a=1", "/hello?x", "/stream/100000", "/echo"):
            async with session.get(f"https://registry.test{path}", proxy=gw.url,
                                   ssl=ctx) as resp:
                assert resp.status == 200
                assert resp.headers["Via"] == "1.1 trivy-gateway"
                bodies.append(await resp.read())
    assert bodies[0] == b"hello https://registry.test/hello\n"
    assert len(bodies[3]) == 100000
    echo = json.loads(bodies[1])
    assert echo["scheme"] == "https" and echo["host"] == "registry.test" and echo["port"] == 443
    assert echo["target"] == "/echo?a=1"
    headers = dict(echo["headers"])
    assert headers["Host"] == "registry.test"
    assert headers["Via"] == "1.1 trivy-gateway"
    assert not {"Connection", "Proxy-Connection", "Proxy-Authorization"} & set(headers)
    # all five requests came over one client connection: one CONNECT, one leaf minted
    assert len({ex.client for ex in gw.handler.exchanges}) == 1
    assert gw.metric("trivy_gateway_tls_leaf_certificates_minted_total") == 1
    assert gw.metric("trivy_gateway_requests_total", host="registry.test", decision="intercept",
                     status="200", door="proxy") == 6         # CONNECT + 5 requests
    assert gw.metric("trivy_gateway_tls_handshake_errors_total") == 0


async def test_curl_accepts_minted_certificate_and_reuses_connection(gw):
    code, out, err = await curl("-v", "--proxy", gw.url, "--cacert", gw.ca_path,
                                "https://registry.test/hello", "https://registry.test/hello?again")
    assert code == 0, err
    assert out == "hello https://registry.test/hello\nhello https://registry.test/hello?again\n"
    assert "ALPN: server accepted http/1.1" in err
    assert err.count("CONNECT registry.test:443") == 1
    assert "Re-using existing connection" in err
    # a wildcard-matched host gets its own leaf with its own SAN
    code, out, err = await curl("--proxy", gw.url, "--cacert", gw.ca_path,
                                "https://eu.cdn.test/hello")
    assert code == 0, err
    assert gw.metric("trivy_gateway_tls_leaf_certificates_minted_total") == 2


async def test_client_not_trusting_ca_is_counted_as_handshake_error(gw):
    code, out, err = await curl("--proxy", gw.url, "https://registry.test/hello")
    assert code == 60, err                      # curl: peer certificate cannot be authenticated
    for _ in range(50):
        if gw.metric("trivy_gateway_tls_handshake_errors_total"):
            break
        await asyncio.sleep(0.02)
    assert gw.metric("trivy_gateway_tls_handshake_errors_total") == 1
    assert gw.server.active_connections == 0


async def test_denied_connect_explains_in_reason_phrase_and_body(gw):
    raw = await raw_request(gw.port, b"CONNECT registry.example.test:443 HTTP/1.1\r\n"
                                     b"Host: registry.example.test:443\r\nConnection: close\r\n\r\n")
    assert status_line(raw) == ("HTTP/1.1 403 registry.example.test is not on the gateway "
                                "allowlist (policy.rules)")
    body = raw.split(b"\r\n\r\n", 1)[1].decode()
    assert "policy.rules" in body and "{host: registry.example.test, action: intercept}" in body
    raw = await raw_request(gw.port, b"CONNECT check.trivy.dev:443 HTTP/1.1\r\n"
                                     b"Host: check.trivy.dev:443\r\nConnection: close\r\n\r\n")
    assert status_line(raw) == ("HTTP/1.1 403 version check and telemetry are disabled by the "
                                "gateway (policy.rules: check.trivy.dev)")
    assert gw.metric("trivy_gateway_denied_total", host="other", reason="not_allowed") == 1
    assert gw.metric("trivy_gateway_denied_total", host="check.trivy.dev", reason="rule") == 1
    raw = await raw_request(gw.port, b"CONNECT registry.test:8443 HTTP/1.1\r\n"
                                     b"Host: registry.test:8443\r\nConnection: close\r\n\r\n")
    assert status_line(raw).startswith("HTTP/1.1 403 port 8443 is not allowed for registry.test")


async def test_absolute_form_plain_http_with_hop_by_hop_and_host_rewrite(gw):
    request = (b"GET http://registry.test/echo?q=1 HTTP/1.1\r\n"
               b"Host: somewhere-else.test\r\n"            # RFC 9112 3.2.2: ignored for absolute-form
               b"Proxy-Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
               b"Connection: keep-alive, X-Hop\r\nX-Hop: secret-hop\r\nX-End: kept\r\n"
               b"Via: 1.0 corp-proxy\r\n\r\n"
               b"GET http://registry.test/hello HTTP/1.1\r\nHost: registry.test\r\n"
               b"Connection: close\r\n\r\n")
    raw = await raw_request(gw.port, request)
    first, second = raw.split(b"HTTP/1.1 200 OK\r\n")[1:]
    echo = json.loads(first.split(b"\r\n\r\n", 1)[1])
    assert echo["scheme"] == "http" and echo["port"] == 80 and echo["target"] == "/echo?q=1"
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["host"] == "registry.test"
    assert headers["via"] == "1.0 corp-proxy, 1.1 trivy-gateway"
    assert headers["x-end"] == "kept"
    assert not {"x-hop", "proxy-connection", "keep-alive", "connection"} & set(headers)
    assert second.endswith(b"hello http://registry.test/hello\n")   # pipelined, same connection
    # https:// in absolute-form is refused with a hint
    raw = await raw_request(gw.port, b"GET https://registry.test/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_line(raw).startswith("HTTP/1.1 400")
    assert b"CONNECT" in raw
    # denied absolute-form request
    raw = await raw_request(gw.port, b"GET http://nope.test/ HTTP/1.1\r\nHost: nope.test\r\n"
                                     b"Connection: close\r\n\r\n")
    assert status_line(raw) == "HTTP/1.1 403 nope.test is not on the gateway allowlist (policy.rules)"


async def test_aiohttp_http_proxy_and_curl_plain(gw):
    async with aiohttp.ClientSession() as session:
        async with session.get("http://registry.test/stream/300000?chunked=1", proxy=gw.url) as r:
            assert r.status == 200
            assert r.headers.get("Transfer-Encoding") == "chunked"
            assert len(await r.read()) == 300000
    code, out, err = await curl("--proxy", gw.url, "http://registry.test/hello")
    assert code == 0 and out == "hello http://registry.test/hello\n", err


@pytest.mark.parametrize("data,status,needle", [
    (b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n", 400, b"forward proxy"),
    (b"GARBAGE\r\n\r\n", 400, b"malformed"),
    (b"GET http://registry.test/ HTTP/1.1\r\nBad Header\r\n\r\n", 400, b"malformed"),
    (b"CONNECT registry.test HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"missing port"),
    (b"CONNECT registry.test:99999 HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"bad port"),
    (b"CONNECT user@registry.test:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"user information"),
    (b"CONNECT [::1:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"IPv6"),
    (b"CONNECT bad_host!:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"not a valid host"),
    (b"GET ftp://registry.test/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"unsupported scheme"),
    (b"GET http://registry.test/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
     431, b"max_header_bytes"),
], ids=["origin-form", "garbage", "bad-header", "no-port", "bad-port", "userinfo", "ipv6",
        "bad-host", "ftp", "huge-head"])
async def test_bad_requests_get_clear_4xx(gw, data, status, needle):
    raw = await raw_request(gw.port, data)
    assert status_line(raw).startswith(f"HTTP/1.1 {status}"), raw[:300]
    assert needle in raw
    total = sum(gw.metric("trivy_gateway_client_errors_total", reason=r)
                for r in ("malformed", "bad_target", "not_proxy_request", "header_too_large"))
    assert total == 1


async def test_misdirected_request_inside_tunnel_is_421(gw):
    async with aiohttp.ClientSession() as session:
        async with session.get("https://registry.test/hello", proxy=gw.url,
                               headers={"Host": "other.test"}, ssl=client_ssl(gw.ca_path)) as r:
            assert r.status == 421
            assert "CONNECT registry.test" in await r.text()
    assert gw.handler.exchanges == []


async def test_chunked_request_body_is_streamed_with_backpressure(gw, tmp_path):
    total = 24 * 1024 * 1024
    sent = hashlib.sha256()

    async def producer():
        block = bytes(range(256)) * 256            # 64 KiB
        for _ in range(total // len(block)):
            sent.update(block)
            yield block

    async with aiohttp.ClientSession() as session:
        async with session.post("https://registry.test/echo", data=producer(), proxy=gw.url,
                                ssl=client_ssl(gw.ca_path)) as r:
            echo = await r.json()
    assert echo["body_bytes"] == total
    assert echo["sha256"] == sent.hexdigest()
    assert echo["body_chunks"] > 10                 # arrived as a stream, not one buffer
    assert dict(echo["headers"]).get("Transfer-Encoding") is None
    # fixed-length body over plain HTTP, with Expect: 100-continue (curl sends it for > 1 MiB)
    payload = b"z" * (3 * 1024 * 1024)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload)
    code, out, err = await curl("-v", "--proxy", gw.url, "--data-binary", f"@{upload}",
                                "-H", "Expect: 100-continue", "http://registry.test/echo")
    assert code == 0, err
    echo = json.loads(out)
    assert echo["body_bytes"] == len(payload)
    assert echo["sha256"] == hashlib.sha256(payload).hexdigest()
    assert "HTTP/1.1 100 Continue" in err


async def test_head_and_empty_bodies(gw):
    ctx = client_ssl(gw.ca_path)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        async with session.head("https://registry.test/stream/12345", proxy=gw.url,
                                ssl=ctx) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == "12345"
            assert await r.read() == b""
        # the connection is still usable after HEAD (framing was right)
        async with session.get("https://registry.test/hello", proxy=gw.url, ssl=ctx) as r:
            assert await r.read() == b"hello https://registry.test/hello\n"
    assert len({ex.client for ex in gw.handler.exchanges}) == 1
    assert gw.handler.closed_bodies == 1       # the HEAD's body was closed, never sent


async def test_body_failing_mid_stream_aborts_the_client_connection(gw):
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get("https://registry.test/fail-mid/500000", proxy=gw.url,
                                   ssl=client_ssl(gw.ca_path)) as r:
                assert r.status == 200
                await r.read()
        # chunked variant: the terminating chunk must never be sent
        raw = await raw_request(gw.port, b"GET http://registry.test/fail-mid/1000 HTTP/1.1\r\n"
                                         b"Host: registry.test\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200")
        assert b"Content-Length: 2000" in raw and len(raw.split(b"\r\n\r\n", 1)[1]) == 1000
    assert gw.handler.closed_bodies == 2


async def test_client_disconnect_mid_response_closes_the_body(gw):
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET http://registry.test/stream/1000000000 HTTP/1.1\r\nHost: registry.test\r\n\r\n")
    await reader.readexactly(1024 * 1024)
    writer.transport.abort()
    for _ in range(200):
        if gw.handler.closed_bodies:
            break
        await asyncio.sleep(0.01)
    assert gw.handler.closed_bodies == 1
    assert gw.metric("trivy_gateway_client_errors_total", reason="disconnected") == 1


async def test_file_body_uses_sendfile_on_plain_and_streams_over_tls(gw, tmp_path, monkeypatch):
    data = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    gw.handler.file_path = str(path)
    iterated = []
    original = FileBody.chunks

    def counting_chunks(self):
        iterated.append(self.path)
        return original(self)
    monkeypatch.setattr(FileBody, "chunks", counting_chunks)
    async with aiohttp.ClientSession() as session:
        async with session.get("http://registry.test/file", proxy=gw.url) as r:
            assert r.headers["Content-Length"] == str(len(data))
            assert await r.read() == data
        async with session.get("http://registry.test/hello", proxy=gw.url) as r:
            assert r.status == 200                   # framing bookkeeping stayed right after sendfile
        assert iterated == []                        # plain: loop.sendfile, never read in Python
        async with session.get("https://registry.test/file", proxy=gw.url,
                               ssl=client_ssl(gw.ca_path)) as r:
            assert await r.read() == data
        assert iterated == [str(path)]               # TLS: bytes must pass through the SSL layer


async def test_header_and_idle_timeouts(tmp_path):
    settings = make_settings(tmp_path, rules=RULES,
                             proxy={"header_timeout": 0.3, "idle_timeout": 0.3})
    async with running_gateway(settings) as gw:
        raw = await raw_request(gw.port, b"GET http://registry.test/hello HTTP/1.1\r\nHo")
        assert status_line(raw).startswith("HTTP/1.1 408")
        assert gw.metric("trivy_gateway_client_errors_total", reason="header_timeout") == 1
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        async with asyncio.timeout(3):
            assert await reader.read() == b""       # idle connection closed, nothing sent
        writer.close()
        # kept alive after a request: the idle timeout counts from the last read (the timer
        # armed for the first read is re-armed, not reused as is)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        loop = asyncio.get_running_loop()
        for _ in range(3):
            await asyncio.sleep(0.2)                 # < idle_timeout between requests
            writer.write(b"GET http://registry.test/hello HTTP/1.1\r\nHost: registry.test\r\n\r\n")
            async with asyncio.timeout(3):
                assert (await reader.readline()).startswith(b"HTTP/1.1 200")
                await reader.readuntil(b"hello http://registry.test/hello\n")
        last = loop.time()
        async with asyncio.timeout(3):
            assert await reader.read() == b""
        assert loop.time() - last >= 0.25            # not closed early by a stale deadline
        writer.close()
        # a request body that stalls mid-way: the connection is closed, not held forever
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST http://registry.test/echo HTTP/1.1\r\nHost: registry.test\r\n"
                     b"Content-Length: 10\r\n\r\nabc")
        async with asyncio.timeout(5):
            while await reader.read(65536):
                pass
        writer.close()


async def test_proxy_auth(tmp_path):
    settings = make_settings(tmp_path, rules=RULES, auth=True)
    good = base64.b64encode(f"scanner:{PASSWORD}".encode()).decode()
    bad = base64.b64encode(b"scanner:wrong").decode()
    with capture_logs() as logs:
        async with running_gateway(settings) as gw:
            raw = await raw_request(gw.port, b"CONNECT registry.test:443 HTTP/1.1\r\n"
                                             b"Host: registry.test:443\r\nConnection: close\r\n\r\n")
            assert status_line(raw) == "HTTP/1.1 407 Proxy Authentication Required"
            assert b'Proxy-Authenticate: Basic realm="trivy-gateway"' in raw
            raw = await raw_request(gw.port, (f"CONNECT registry.test:443 HTTP/1.1\r\nHost: x\r\n"
                                              f"Proxy-Authorization: Basic {bad}\r\n"
                                              f"Connection: close\r\n\r\n").encode())
            assert status_line(raw).startswith("HTTP/1.1 407")
            raw = await raw_request(gw.port, b"GET http://registry.test/hello HTTP/1.1\r\n"
                                             b"Host: registry.test\r\nConnection: close\r\n\r\n")
            assert status_line(raw).startswith("HTTP/1.1 407")
            raw = await raw_request(gw.port, (f"GET http://registry.test/echo HTTP/1.1\r\n"
                                              f"Host: registry.test\r\nConnection: close\r\n"
                                              f"Proxy-Authorization: Basic {good}\r\n\r\n").encode())
            assert status_line(raw) == "HTTP/1.1 200 OK"
            assert b"Proxy-Authorization" not in raw and good.encode() not in raw
            assert gw.metric("trivy_gateway_proxy_auth_failures_total") == 3
            # Go and curl send the credentials from the proxy URL
            proxy = gw.url.replace("http://", f"http://scanner:{PASSWORD}@")
            code, out, err = await curl("--proxy", proxy, "--cacert", gw.ca_path,
                                        "https://registry.test/hello")
            assert code == 0 and out == "hello https://registry.test/hello\n", err
            code, out, err = await curl("-v", "--proxy", gw.url.replace("http://", "http://scanner:x@"),
                                        "--cacert", gw.ca_path, "https://registry.test/hello")
            assert "407" in err
    text = repr(logs)
    assert PASSWORD not in text and good not in text
    access = [entry for entry in logs if entry.get("event") == "request"]
    assert [e["status"] for e in access].count(407) == 4
    assert all({"request_id", "client", "method", "host", "path", "status", "bytes", "duration",
                "decision", "cache"} <= set(e) for e in access)


async def test_access_log_has_path_without_query(gw):
    with capture_logs() as logs:
        code, out, err = await curl("--proxy", gw.url, "--cacert", gw.ca_path,
                                    "https://registry.test/hello?token=abc")
        assert code == 0, err
    entries = [e for e in logs if e.get("event") == "request"]
    assert [e["method"] for e in entries] == ["CONNECT", "GET"]
    get = entries[1]
    assert get["path"] == "/hello" and "abc" not in repr(get)
    assert get["status"] == 200 and get["bytes"] == len(out) and get["decision"] == "intercept"


async def test_content_length_with_transfer_encoding_is_refused(gw):
    raw = await raw_request(gw.port, b"POST http://registry.test/echo HTTP/1.1\r\n"
                                     b"Host: registry.test\r\nContent-Length: 4\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n")
    assert status_line(raw).startswith("HTTP/1.1 400"), raw[:200]
    assert gw.handler.exchanges == []


class EarlyAnswerHandler(MemoryHandler):
    """Answers before the request body is read: ignoring it, or reading it in the background."""

    def __init__(self) -> None:
        super().__init__()
        self.background: list[asyncio.Task] = []
        self.background_result: list = []

    async def handle(self, ex):
        self.exchanges.append(ex)
        if ex.path == "/background" and ex.body is not None:
            async def consume():
                total = 0
                try:
                    async for chunk in ex.body:
                        total += len(chunk)
                        await asyncio.sleep(0.01)
                except Exception as exc:  # noqa: BLE001
                    self.background_result.append(type(exc).__name__)
                    return
                self.background_result.append(total)
            self.background.append(asyncio.create_task(consume()))
        from gateway.exchange import error_response
        return error_response(401, "early answer")


@pytest.mark.parametrize("size,reused", [(1000, True), (4 * 1024 * 1024, False)])
async def test_unread_request_body_is_discarded_or_connection_closed(tmp_path, size, reused):
    async with running_gateway(make_settings(tmp_path, rules=RULES),
                               handler=EarlyAnswerHandler()) as gw:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            for _ in range(2):
                async with session.post("http://registry.test/ignore", data=b"q" * size,
                                        proxy=gw.url) as r:
                    assert r.status == 401
                    await r.read()
        clients = {ex.client for ex in gw.handler.exchanges}
        assert len(clients) == (1 if reused else 2)


async def test_body_pulled_by_background_task_never_shares_the_socket(tmp_path):
    handler = EarlyAnswerHandler()
    async with running_gateway(make_settings(tmp_path, rules=RULES), handler=handler) as gw:
        async def body():
            for _ in range(50):
                yield b"b" * 65536
                await asyncio.sleep(0.005)
        async with aiohttp.ClientSession() as session:
            try:
                async with session.post("http://registry.test/background", data=body(),
                                        proxy=gw.url) as r:
                    assert r.status == 401
            except aiohttp.ClientError:
                pass                       # the gateway may cut the upload short: allowed
        await asyncio.wait_for(asyncio.gather(*handler.background), 10)
    # the background reader got either an error or part of the body; never a RuntimeError
    assert handler.background_result and handler.background_result[0] != "RuntimeError"


async def test_connection_cap_answers_503_and_recovers(tmp_path):
    settings = make_settings(tmp_path, rules=RULES, proxy={"max_connections": 2})
    async with running_gateway(settings) as gw:
        held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(2)]
        for _ in range(50):                      # both accepted and counted (bounded wait)
            if gw.server.active_connections == 2:
                break
            await asyncio.sleep(0.02)
        assert gw.server.active_connections == 2
        raw = await raw_request(gw.port, b"GET http://registry.test/hello HTTP/1.1\r\n"
                                         b"Host: registry.test\r\n\r\n")
        assert status_line(raw).startswith("HTTP/1.1 503"), raw[:200]
        assert b"Retry-After: 1\r\n" in raw and b"max_connections = 2" in raw
        assert gw.metric("trivy_gateway_client_errors_total", reason="too_many_connections") == 1
        # the held connections still work, and once one closes a new client gets in
        reader, writer = held[0]
        writer.write(b"GET http://registry.test/hello HTTP/1.1\r\nHost: registry.test\r\n"
                     b"Connection: close\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
        for _ in range(50):
            if gw.server.active_connections < 2:
                break
            await asyncio.sleep(0.02)
        raw = await raw_request(gw.port, b"GET http://registry.test/hello HTTP/1.1\r\n"
                                         b"Host: registry.test\r\nConnection: close\r\n\r\n")
        assert status_line(raw) == "HTTP/1.1 200 OK"
        held[1][1].close()


async def test_request_head_split_across_tcp_writes(gw):
    """A slow client: the request line and headers arrive in pieces; the request is the same."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    pieces = [b"GET http://regis", b"try.test/hel", b"lo HTTP/1.1\r\nHo", b"st: registry.test\r\n",
              b"Connection: close\r\n", b"\r\n"]
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)                # separate segments, separate reads
    async with asyncio.timeout(5):
        raw = await reader.read()
    writer.close()
    assert status_line(raw) == "HTTP/1.1 200 OK", raw[:200]
    assert raw.endswith(b"hello http://registry.test/hello\n")
