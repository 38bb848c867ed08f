"""Latency of cached requests while the gateway mints leaves for a storm of new names (hardening
issue, D9). A measurement, not a test.

    python bench/mint_storm.py                   # 50-way storm, 1,500 distinct names (~30 s)
    python bench/mint_storm.py --storm 50 --names 600

Starts the emulated world (a thread of this process, serving a 4 KiB Maven POM) and a real
gateway subprocess with one extra rule, ``*.storm.test: intercept``. A probe process keeps one
intercepted connection to repo.maven.apache.org and asks for the cached POM back to back,
recording each request's latency; first alone (quiet), then while a storm process runs
``--storm`` threads that each CONNECT to a new ``n<i>.storm.test``, finish the TLS handshake
(the gateway mints a leaf for every name) and hang up. Prints the probe's median / p99 latency in
both phases and the storm's handshakes per second. Every process started here is stopped.
"""
from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from idle_tls import POM_PATH, TARGET, _read_response, stop_all  # noqa: E402  (bench/ on sys.path)

HOST = "repo.maven.apache.org"


def _connect(port: int, ctx: ssl.SSLContext, host: str) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = _read_response(sock)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"CONNECT {host}: {head[:200]!r}")
    return ctx.wrap_socket(sock, server_hostname=host)


def probe_main(port: int, cafile: str, seconds: float) -> None:
    """Ask for the cached POM back to back on one connection for ``seconds``; print latencies."""
    ctx = ssl.create_default_context(cafile=cafile)
    sock = _connect(port, ctx, HOST)
    request = f"GET {TARGET} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        sock.sendall(request)
        head = _read_response(sock)
        out.append(time.perf_counter() - t0)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:200])
    sock.close()
    print(" ".join(f"{x:.6f}" for x in out), flush=True)


def storm_main(port: int, cafile: str, threads: int, names: int) -> None:
    """``names`` handshakes, each for a new name, ``threads`` at a time; print handshakes/s."""
    ctx = ssl.create_default_context(cafile=cafile)
    stamp = int(time.time() * 1000) % 1_000_000

    def one(i: int) -> None:
        _connect(port, ctx, f"n{stamp}-{i}.storm.test").close()

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(names)))
    print(f"{names / (time.monotonic() - t0):.1f}", flush=True)


def _summary(samples: list[float]) -> str:
    ms = sorted(x * 1000 for x in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"median {statistics.median(ms):7.2f} ms   p99 {p99:7.2f} ms   ({len(ms)} requests)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storm", type=int, default=50, help="concurrent handshakes for new names")
    p.add_argument("--names", type=int, default=1500, help="distinct names in the storm")
    p.add_argument("--quiet", type=float, default=5.0, help="seconds of the quiet phase")
    p.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--storm-client", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.probe:
        probe_main(int(a.probe[0]), a.probe[1], float(a.probe[2]))
        return 0
    if a.storm_client:
        storm_main(int(a.storm_client[0]), a.storm_client[1], int(a.storm_client[2]),
                   int(a.storm_client[3]))
        return 0

    from run import make_pom
    from tests.emulated.world import WorldThread
    from tests.gateway_harness import GatewayProcess

    work = Path(tempfile.mkdtemp(prefix="trivy-gateway-mint-"))
    world = gw = None
    procs: list[subprocess.Popen] = []
    try:
        world = WorldThread(work / "world", db_size_mib=0.05).start(timeout=300)
        world.maven.put(POM_PATH, make_pom(4096))
        import yaml
        from gateway.settings import default_config_text
        rules = yaml.safe_load(default_config_text())["policy"]["rules"]   # lists replace
        from gateway.settings import ProxySettings
        proxy = ({"max_connections_per_client": 0}       # every client is 127.0.0.1 here
                 if "max_connections_per_client" in ProxySettings.__dataclass_fields__ else {})
        gw = GatewayProcess(work / "gateway", world, {
            "proxy": proxy, "logging": {"access_log": False},
            "policy": {"rules": [{"host": "*.storm.test", "action": "intercept"}, *rules]}})
        gw.start(timeout=60)
        me = [sys.executable, __file__]
        port, ca = str(gw.proxy_port), str(gw.ca_pem)
        subprocess.run(me + ["--probe", port, ca, "0.5"], check=True, timeout=60,
                       capture_output=True)                        # miss, then cached
        quiet = subprocess.run(me + ["--probe", port, ca, str(a.quiet)], check=True,
                               timeout=120, capture_output=True, text=True)
        storm = subprocess.Popen(me + ["--storm-client", port, ca, str(a.storm), str(a.names)],
                                 stdout=subprocess.PIPE, text=True)
        procs.append(storm)
        time.sleep(0.5)                                          # the storm is under way
        busy = subprocess.Popen(me + ["--probe", port, ca, "5"], stdout=subprocess.PIPE,
                                text=True)
        procs.append(busy)
        busy_out, _ = busy.communicate(timeout=120)
        rate, _ = storm.communicate(timeout=600)
        if storm.returncode:
            raise RuntimeError("the storm client failed")
        q = [float(x) for x in quiet.stdout.split()]
        b = [float(x) for x in busy_out.split()]
        print(f"cached POM, one connection, quiet:        {_summary(q)}")
        print(f"cached POM, one connection, during storm: {_summary(b)}")
        print(f"storm: {a.storm} concurrent handshakes for {a.names} new names: "
              f"{rate.strip()} handshakes/s")
        return 0
    finally:
        stop_all(procs, gw, world, work)


if __name__ == "__main__":
    sys.exit(main())
