"""Leaf minting off the event loop: a storm of new names must not stall other connections, and
connections asking for the same new name share one mint."""
from __future__ import annotations

import asyncio
import threading

from gateway.tls import LeafIssuer

from proxy_support import make_settings, open_intercepted, running_gateway

RULES = [{"host": "registry.test", "action": "intercept"},
         {"host": "*.cdn.test", "action": "intercept"}]


class GatedIssuer(LeafIssuer):
    """The real issuer, whose signing waits for ``gate``: a mint that takes as long as the test
    wants, so the order of events shows whether anything else ran meanwhile."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.waiting = 0
        #: a mint gave up waiting: nothing released the gate (the loop itself was stuck in it)
        self.timed_out = False
        self._lock = threading.Lock()

    def mint(self, host: str):
        with self._lock:
            self.waiting += 1
        if not self.gate.wait(5):           # a bound so a broken build cannot hang the test
            self.timed_out = True
        return super().mint(host)


async def _get_hello(reader, writer, host: str = "registry.test") -> bytes:
    writer.write(f"GET /hello HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    body = await reader.readuntil(f"hello https://{host}/hello\n".encode())
    return head + body


async def test_cached_request_completes_during_a_mint_storm(tmp_path):
    async with running_gateway(make_settings(tmp_path, rules=RULES)) as gw:
        issuer = GatedIssuer(gw.ca, gw.settings, gw.metrics)
        gw.server.leaf_issuer = issuer
        issuer.gate.set()
        reader, writer = await open_intercepted(gw)          # registry.test's leaf is now cached
        issuer.gate.clear()
        events: list[str] = []
        storm = []
        for i in range(8):                                # 8 new names, all mints held
            r, w = await asyncio.open_connection("127.0.0.1", gw.port)
            w.write(f"CONNECT n{i}.cdn.test:443 HTTP/1.1\r\nHost: n{i}.cdn.test:443\r\n\r\n"
                    .encode())
            storm.append((r, w))
        for _ in range(200):                              # the mints have started (bounded)
            if issuer.waiting:
                break
            await asyncio.sleep(0.01)
        assert issuer.waiting
        async with asyncio.timeout(60):
            assert (await _get_hello(reader, writer)).startswith(b"HTTP/1.1 200")
        events.append("cached request answered")
        assert not issuer.timed_out             # answered while the mints were still held
        issuer.gate.set()
        events.append("mints released")
        async with asyncio.timeout(30):
            answers = [await r.readuntil(b"\r\n\r\n") for r, _ in storm]
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
        # the cached request did not wait for any mint
        assert events == ["cached request answered", "mints released"]
        for _, w in storm:
            w.close()
        writer.close()


async def test_concurrent_connects_for_one_new_name_mint_once(tmp_path):
    async with running_gateway(make_settings(tmp_path, rules=RULES)) as gw:
        issuer = GatedIssuer(gw.ca, gw.settings, gw.metrics)
        gw.server.leaf_issuer = issuer
        conns = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(10)]
        for _, w in conns:
            w.write(b"CONNECT same.cdn.test:443 HTTP/1.1\r\nHost: same.cdn.test:443\r\n\r\n")
        for _ in range(500):        # every CONNECT head read: each is then at the mint
            if gw.server.busy_connections == 10:
                break
            await asyncio.sleep(0.01)
        assert gw.server.busy_connections == 10
        issuer.gate.set()
        async with asyncio.timeout(30):
            for r, _ in conns:
                assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert issuer.waiting == 1
        assert gw.metric("trivy_gateway_tls_leaf_certificates_minted_total") == 1
        for _, w in conns:
            w.close()
