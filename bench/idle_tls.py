"""Memory held per idle intercepted TLS connection (hardening issue, D2). A measurement, not a test.

    python bench/idle_tls.py                 # 3,000 intercepted connections (~1 minute)
    python bench/idle_tls.py --conns 500     # quicker

Starts the emulated world (a thread of this process, serving a 4 KiB Maven POM) and a real
gateway subprocess (``tests/gateway_harness.GatewayProcess``), warms the POM into the cache,
then a separate client process opens ``--conns`` connections: CONNECT repo.maven.apache.org:443,
TLS handshake with the gateway's leaf, one GET of the POM (a cache hit), and keeps each open and
idle. psutil reads the gateway's RSS before, with all of them open, and after the client closed
them (once the gateway counts no client connection any more). Prints the three figures and the
KiB per connection held and retained. Every process started here is stopped before exit.
"""
from __future__ import annotations

import argparse
import socket
import ssl
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

HOST = "repo.maven.apache.org"
POM_PATH = "org/example/bench/idle-lib/1.0.0/idle-lib-1.0.0.pom"
TARGET = f"/maven2/{POM_PATH}"
MIB = 1024 * 1024


# -- the client process -------------------------------------------------------------------------
def _read_response(sock) -> bytes:
    """One response with a Content-Length body (what a cached POM gets)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"connection closed after {data[:200]!r}")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError("connection closed in the body")
        body += piece
    return head


def _open_one(port: int, ctx: ssl.SSLContext):
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
    head = _read_response(sock)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"CONNECT: {head[:200]!r}")
    sock = ctx.wrap_socket(sock, server_hostname=HOST)
    sock.sendall(f"GET {TARGET} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head = _read_response(sock)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET: {head[:200]!r}")
    return sock


def client_main(port: int, cafile: str, conns: int) -> None:
    """Open ``conns`` connections, print ``OPEN n``, hold them until stdin closes, close them."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, conns + 256)), hard))
    ctx = ssl.create_default_context(cafile=cafile)
    with ThreadPoolExecutor(8) as pool:
        socks = list(pool.map(lambda _: _open_one(port, ctx), range(conns)))
    print(f"OPEN {len(socks)}", flush=True)
    sys.stdin.read()                          # the orchestrator closes our stdin when done
    for s in socks:
        s.close()
    print("CLOSED", flush=True)


# -- the orchestrator ---------------------------------------------------------------------------
def rss_mib(pid: int) -> float:
    import psutil
    return psutil.Process(pid).memory_info().rss / MIB


def wait_connections(gw, at_most: int, timeout: float = 60.0) -> float:
    """Wait (bounded) until the gateway counts at most ``at_most`` client connections."""
    deadline = time.monotonic() + timeout
    while True:
        active = gw.metric("trivy_gateway_active_connections")
        if active <= at_most or time.monotonic() > deadline:
            return active
        time.sleep(0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conns", type=int, default=3000)
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each reading")
    p.add_argument("--client", nargs=3, metavar=("PORT", "CAFILE", "CONNS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.client:
        client_main(int(a.client[0]), a.client[1], int(a.client[2]))
        return 0

    from run import make_pom
    from tests.emulated.world import WorldThread
    from tests.gateway_harness import GatewayProcess

    from gateway.settings import ProxySettings

    work = Path(tempfile.mkdtemp(prefix="trivy-gateway-idle-"))
    world = gw = client = None
    try:
        world = WorldThread(work / "world", db_size_mib=0.05).start(timeout=300)
        world.maven.put(POM_PATH, make_pom(4096))
        proxy = {"max_connections": a.conns + 512, "idle_timeout": "10m"}
        if "max_connections_per_client" in ProxySettings.__dataclass_fields__:
            proxy["max_connections_per_client"] = 0   # every client is 127.0.0.1 here
        extra = {"proxy": proxy, "server": {"drain_grace": "5s"},
                 "logging": {"access_log": False}}
        gw = GatewayProcess(work / "gateway", world, extra).start(timeout=60)
        pid = gw.proc.pid
        cmd = [sys.executable, __file__, "--client", str(gw.proxy_port),
               str(gw.ca_pem), "1"]
        subprocess.run(cmd, input="", text=True, check=True, timeout=60)  # miss, then cached
        subprocess.run(cmd, input="", text=True, check=True, timeout=60)  # a hit: warm code paths
        wait_connections(gw, 0)
        time.sleep(a.settle)
        before = rss_mib(pid)
        t0 = time.monotonic()
        client = subprocess.Popen(cmd[:-1] + [str(a.conns)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        line = client.stdout.readline().strip()
        if not line.startswith("OPEN "):
            raise RuntimeError(f"client failed: {line!r}")
        opened = time.monotonic() - t0
        time.sleep(a.settle)
        held = rss_mib(pid)
        active = gw.metric("trivy_gateway_active_connections")
        client.stdin.close()
        client.wait(120)
        left = wait_connections(gw, 0)
        time.sleep(a.settle)
        after = rss_mib(pid)
        n = a.conns
        print(f"idle intercepted connections: {n} (opened in {opened:.1f}s; gateway counted "
              f"{active:.0f} open, {left:.0f} after close)")
        print(f"gateway RSS  before {before:7.1f} MiB   open {held:7.1f} MiB   "
              f"after close {after:7.1f} MiB")
        print(f"per connection while open: {(held - before) * 1024 / n:6.1f} KiB; "
              f"retained after close: {(after - before) * 1024 / n:6.1f} KiB")
        return 0
    finally:
        stop_all([client] if client is not None else [], gw, world, work)


def stop_all(procs, gw, world, work: Path) -> None:
    """Stop what a measurement started: client processes by PID, the gateway, the world; then
    remove the work dir."""
    import shutil
    for pr in procs:
        if pr.poll() is None:
            pr.kill()
            pr.wait(10)
    if gw is not None:
        gw.stop()
    if world is not None:
        world.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
