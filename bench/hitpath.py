#!/usr/bin/env python3
"""CPU per small cache hit in the layers *below* the proxy, measured in-process.

``bench/run.py`` measures the whole gateway through real sockets and TLS; this script isolates
what the proxy calls for one hit, so a change in the pipeline, the resources, the entry store
or the logging set-up can be compared without the noise of TLS, h11 and the load generator:

- the real pipeline wired as ``gateway/app.py`` wires it (settings from
  :func:`gateway.settings.load_settings` with a temporary ``data_dir``, real BlobStore,
  EntryStore with its memory front, UpstreamClient, Metrics);
- the emulated upstream world (``tests/emulated``) on 127.0.0.1, reached through the gateway's
  own ``upstream.address_overrides`` / ``upstream.ca_bundle``; one real miss stores a 4 KiB
  Maven release POM (as ``bench/run.py`` uses);
- then ``N`` hits: ``await pipeline.handle(Exchange(...))`` with the headers a Go client sends,
  reading ``BytesBody.data`` and closing the body;
- and ``N`` hits the way the proxy asks first: ``pipeline.try_hit(Exchange(...))`` (synchronous;
  when it answers None, as it does once per purge-marker interval, ``handle`` as the proxy does).

Also timed on their own: one access-log line (logging configured as the gateway does, to
``/dev/null``) through the bound structlog logger and through :class:`InfoLine` (what the proxy
calls; the fields dict is built per line there too), ``classify()``, ``EntryStore.get()`` and
the cache-request metric increment. ``--profile ROW`` prints a cProfile of one row instead of
timing it (the row's number in the output, from 1).
Figures are µs per operation: main-thread CPU time (``time.thread_time``; the world's thread is
idle meanwhile) and wall time; best of ``--rounds``. Not a test: nothing is asserted on time.

    python bench/hitpath.py [-n 20000] [--rounds 3] [--loop asyncio|uvloop] [--profile ROW]
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from multidict import CIMultiDict  # noqa: E402

from gateway.app import known_hosts  # noqa: E402
from gateway.cache import BlobStore, EntryStore  # noqa: E402
from gateway.exchange import BytesBody, Exchange  # noqa: E402
from gateway.observability.logging import InfoLine, configure_logging, get_logger  # noqa: E402
from gateway.observability.metrics import Metrics  # noqa: E402
from gateway.pipeline import Pipeline  # noqa: E402
from gateway.policy import Policy  # noqa: E402
from gateway.proxy.connection import ClientConnection  # noqa: E402
from gateway.proxy.server import ProxyServer  # noqa: E402
from gateway.proxy.stream import ClientStream  # noqa: E402
from gateway.resources import classify  # noqa: E402
from gateway.settings import load_settings  # noqa: E402
from gateway.upstream import UpstreamClient  # noqa: E402
from run import make_pom  # noqa: E402 - the same POM bytes as run.py's small figure

MAVEN = "repo.maven.apache.org"
POM_PATH = "org/example/bench/bench-lib/1.0.0/bench-lib-1.0.0.pom"
TARGET = f"/maven2/{POM_PATH}"


class _NullTransport:
    """Enough of a transport for :class:`ClientStream` and the connection (bench only)."""

    def __init__(self) -> None:
        self.last = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.last = len(data)

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    abort = close


def go_exchange() -> Exchange:
    """What gateway/proxy/connection.py builds for Go's ``GET`` inside an intercepted tunnel."""
    headers = CIMultiDict([("User-Agent", "Go-http-client/1.1"), ("Accept-Encoding", "gzip"),
                           ("Host", MAVEN), ("Via", "1.1 trivy-gateway")])
    ex = Exchange(method="GET", scheme="https", host=MAVEN, port=443, target=TARGET,
                  headers=headers, client="127.0.0.1:40000")
    ex.notes["decision"] = "intercept"
    return ex


#: ``--profile``: the row to profile instead of timing (1-based), and how many rows so far
_profile = {"row": 0, "seen": 0}


async def timed(n: int, rounds: int, op: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(cpu µs, wall µs) per ``op``, best of ``rounds``; includes the loop turns it causes."""
    _profile["seen"] += 1
    if _profile["seen"] == _profile["row"]:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            await op()
        prof.disable()
        pstats.Stats(prof).sort_stats(os.environ.get("HITPATH_SORT", "tottime")).print_stats(int(os.environ.get("HITPATH_TOP", "25")))
        return 0.0, 0.0
    best_cpu = best_wall = float("inf")
    for _ in range(rounds):
        c0, w0 = time.thread_time(), time.perf_counter()
        for i in range(n):
            await op()
            if i % 1000 == 999:
                await asyncio.sleep(0)  # let call_later'd work (log flushes) run, as in service
        await asyncio.sleep(0.03)     # the access log's batched flush, counted in CPU time
        c1, w1 = time.thread_time(), time.perf_counter()
        best_cpu = min(best_cpu, (c1 - c0) / n * 1e6)
        best_wall = min(best_wall, (w1 - w0 - 0.03) / n * 1e6)
    return best_cpu, best_wall


async def run(args, world) -> list[tuple[str, float, float]]:
    work = Path(tempfile.mkdtemp(prefix="hitpath-"))
    cfg = {
        "server": {"data_dir": str(work / "data"), "listen": "127.0.0.1:0",
                   "admin_listen": "127.0.0.1:0"},
        "upstream": {"ca_bundle": str(world.ca_pem),
                     "address_overrides": dict(world.address_overrides)},
        "cache": {"min_free_space": 0},
        "logging": {"level": "info", "format": "json"},
    }
    (work / "gateway.yaml").write_text(yaml.safe_dump(cfg))
    s = load_settings(str(work / "gateway.yaml"), env={})
    devnull = open(os.devnull, "w")
    configure_logging(s.logging, stream=devnull)

    metrics = Metrics(known_hosts(s))
    policy = Policy(s.policy)
    cache_root = s.data_dir / "cache"
    s.data_dir.mkdir(parents=True, exist_ok=True)
    blobs = BlobStore(cache_root, s.cache.max_size, s.cache.min_free_space, metrics,
                      s.cache.max_object_size)
    blobs.open()
    entries = EntryStore(cache_root, blobs, s.cache.memory, metrics)
    entries.open()
    upstream = UpstreamClient(s.upstream, metrics, address_guard=policy.address_allowed)
    await upstream.start()
    pipeline = Pipeline(s, blobs, entries, upstream, metrics)
    rows: list[tuple[str, float, float]] = []
    try:
        # one real miss through the pipeline, then wait until the entry is stored
        resp = await pipeline.handle(go_exchange())
        got = b"".join([c async for c in resp.body.chunks()])
        await resp.body.close()
        assert resp.status == 200 and got == world.maven.files[POM_PATH], resp.status
        for _ in range(500):
            if not pipeline._jobs:  # noqa: SLF001 - the fill's job is gone once stored
                break
            await asyncio.sleep(0.01)
        check = await pipeline.handle(go_exchange())
        assert check.headers["Cache-Status"].startswith("trivy-gateway; hit"), check.headers
        assert isinstance(check.body, BytesBody) and check.body.data == got
        await check.body.close()

        async def hit() -> None:
            r = await pipeline.handle(go_exchange())
            assert r.body.data  # type: ignore[attr-defined]
            await r.body.close()

        rows.append(("pipeline.handle hit (+ Exchange, body)",) + await timed(args.n, args.rounds, hit))

        async def try_hit() -> None:
            ex = go_exchange()
            r = pipeline.try_hit(ex)
            if r is None:                        # not known without awaiting: as the proxy does
                r = await pipeline.handle(ex)
            assert r.body.data  # type: ignore[attr-defined]

        rows.append(("pipeline.try_hit hit (+ Exchange)",) + await timed(args.n, args.rounds,
                                                                         try_hit))

        # the proxy's callback mode end to end, minus the socket and TLS: the request bytes Go
        # sends go to the connection's data callback; parse, prepare, try_hit, one write, the
        # access line and the metrics (a transport that keeps only the size of the last write)
        server = ProxyServer(s, policy, None, pipeline, metrics)
        transport = _NullTransport()
        stream = ClientStream(lambda _stream: None)
        stream.connection_made(transport)  # type: ignore[arg-type]
        conn = ClientConnection(server, stream)
        # as after CONNECT: the authority and its request shapes (proxy/shapes.py)
        conn.tls_host, conn.tls_port = MAVEN, 443
        conn._shapes = server.shapes_for(MAVEN, 443, conn.settings)  # noqa: SLF001
        conn.start()
        request = (f"GET {TARGET} HTTP/1.1\r\nHost: {MAVEN}\r\n"
                   "User-Agent: Go-http-client/1.1\r\n\r\n").encode()

        async def callback_hit() -> None:
            stream.data_received(request)
            task = conn._task  # noqa: SLF001 - handed over (e.g. a purge-marker check is due)
            if task is not None:
                await asyncio.wait_for(asyncio.shield(task), 10)
            assert transport.last > len(got)

        rows.append(("proxy callback hit (parse..write, account)",)
                    + await timed(args.n, args.rounds, callback_hit))
        # the same hit with a head the connection has not seen (a field that changes every
        # time): parsed and routed, no shape replayed, a classification per request
        seq = iter(range(10 ** 9))

        async def callback_new_head() -> None:
            stream.data_received(request[:-2] + b"X-Seq: %d\r\n\r\n" % next(seq))
            task = conn._task  # noqa: SLF001
            if task is not None:
                await asyncio.wait_for(asyncio.shield(task), 10)
            assert transport.last > len(got)

        rows.append(("proxy callback hit, head not seen before",)
                    + await timed(args.n, args.rounds, callback_new_head))
        conn.abort()

        access = get_logger("gateway.access").bind()
        fields = dict(request_id="a1b2c3-1f", client="127.0.0.1:40000", method="GET",
                      scheme="https", host=MAVEN, port=443, path=TARGET, status=200,
                      bytes=len(got), duration=0.0004, decision="intercept", cache="hit",
                      door="proxy")

        async def log_line() -> None:
            access.info("request", **fields)

        rows.append(("access-log line",) + await timed(args.n, args.rounds, log_line))
        info_line = InfoLine(access)

        async def proxy_line() -> None:
            info_line("request", dict(fields))

        rows.append(("access-log line (InfoLine, the proxy's)",) + await timed(args.n, args.rounds,
                                                                               proxy_line))

        lower = {"user-agent": "Go-http-client/1.1", "accept-encoding": "gzip", "host": MAVEN,
                 "via": "1.1 trivy-gateway"}

        async def classify_only() -> None:
            classify("GET", MAVEN, TARGET, "", lower, s.cache, scheme="https")

        rows.append(("classify()",) + await timed(args.n, args.rounds, classify_only))
        key = classify("GET", MAVEN, TARGET, "", lower, s.cache, scheme="https").cache_key

        async def lookup() -> None:
            assert await entries.get(key) is not None

        rows.append(("EntryStore.get()",) + await timed(args.n, args.rounds, lookup))

        ex = go_exchange()
        res = classify("GET", MAVEN, TARGET, "", lower, s.cache, scheme="https")

        async def count() -> None:
            pipeline._count(ex, res, "hit")  # noqa: SLF001 - the per-hit metric increment

        rows.append(("cache-request metric",) + await timed(args.n, args.rounds, count))
    finally:
        await pipeline.close()
        await upstream.close()
        devnull.close()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=20000, help="operations per round (bounded)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--small-bytes", type=int, default=4096)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--profile", type=int, default=0, metavar="ROW",
                    help="cProfile row ROW (1-based, in output order) instead of timing it")
    args = ap.parse_args()
    _profile["row"] = args.profile
    args.n = max(1, min(args.n, 200_000))

    from tests.emulated.world import WorldThread  # noqa: PLC0415 - test support, like run.py

    with tempfile.TemporaryDirectory(prefix="hitpath-world-") as tmp:
        world = WorldThread(Path(tmp) / "world", db_size_mib=0.05)
        world.start(timeout=300)
        try:
            world.maven.put(POM_PATH, make_pom(args.small_bytes))
            factory = None
            if args.loop == "uvloop":
                import uvloop  # noqa: PLC0415 - optional

                factory = uvloop.new_event_loop
            with asyncio.Runner(loop_factory=factory) as runner:
                rows = runner.run(run(args, world))
        finally:
            world.stop()
    print(f"\nhit path below the proxy ({args.loop}, {args.n} ops x {args.rounds} rounds, "
          f"best round; POM {args.small_bytes} B)")
    print(f"{'operation':40} {'cpu µs/op':>10} {'wall µs/op':>11}")
    for name, cpu, wall in rows:
        print(f"{name:40} {cpu:10.1f} {wall:11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
