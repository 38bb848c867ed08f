"""Load generator process for bench/run.py (stdlib only; not a test).

Runs as its own process so the client does not share an interpreter (or a GIL) with the
orchestrator or any server. One process runs ``threads`` blocking-socket threads; blocking
``recv_into`` on a plain or TLS socket releases the GIL while the kernel and OpenSSL work, so
a few threads per process keep the client cheap. Bodies are read into one reused buffer and
discarded.

Usage: ``python bench/loadgen.py '<json spec>'`` → one JSON object on stdout.

Spec keys:
  mode       "stream" (download ``count`` times per thread), "small" (kept-alive request loop
             for ``duration`` seconds after ``warmup``), "tunnels" (new connection per request)
  addr       [host, port] to connect to (the proxy, or the reference server)
  connect    "host:port" to send CONNECT for first, or null (direct)
  tls        wrap the socket in TLS (after CONNECT if any); ``sni`` and ``cafile`` for it
  host, path request Host and path; ``absolute``: send an absolute-form target (plain proxy)
  threads (for "small": connections, all on one selector thread), start_at (epoch seconds: all processes start together), duration, warmup, count,
  bufsize, max_seconds (hard bound for the whole process)
"""
from __future__ import annotations

import json
import resource
import selectors
import socket
import ssl
import sys
import threading
import time


class HTTPError(Exception):
    pass


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Client:
    """One HTTP/1.1 connection (optionally through CONNECT, optionally TLS)."""

    def __init__(self, spec: dict, ctx: ssl.SSLContext | None, bufsize: int) -> None:
        self.spec = spec
        self.ctx = ctx
        self.buf = bytearray(bufsize)
        self.view = memoryview(self.buf)
        self.sock: socket.socket | None = None
        self.pending = b""
        target = spec["path"]
        if spec.get("absolute"):
            target = f"http://{spec['host']}{spec['path']}"
        self.request = (f"GET {target} HTTP/1.1\r\nHost: {spec['host']}\r\n"
                        f"User-Agent: trivy-gateway-bench\r\nAccept: */*\r\n\r\n").encode()
        self.request_close = self.request[:-2] + b"Connection: close\r\n\r\n"

    def open(self, timeout: float = 30.0) -> None:
        host, port = self.spec["addr"]
        s = socket.create_connection((host, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connect = self.spec.get("connect")
        if connect:
            s.sendall(f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    raise HTTPError("proxy closed during CONNECT")
                head += chunk
                if len(head) > 65536:
                    raise HTTPError("CONNECT answer too long")
            status_line = head.split(b"\r\n", 1)[0]
            if b" 200" not in status_line:
                raise HTTPError(f"CONNECT refused: {status_line!r}")
            if not head.endswith(b"\r\n\r\n"):
                raise HTTPError("proxy sent bytes after the CONNECT answer")
        if self.spec.get("tls"):
            s = self.ctx.wrap_socket(s, server_hostname=self.spec.get("sni") or self.spec["host"])
        self.sock = s
        self.pending = b""

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _recv(self) -> bytes:
        data = self.sock.recv(262144)
        if not data:
            raise HTTPError("connection closed by server")
        return data

    def get(self, close: bool = False, on_first_byte=None) -> dict:
        """Send one GET, read the whole response (body discarded)."""
        self.sock.sendall(self.request_close if close else self.request)
        data = self.pending
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                break
            data += self._recv()
            if len(data) > 1 << 20:
                raise HTTPError("response head too long")
        head, rest = data[:end], data[end + 4:]
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
        if on_first_byte is not None and rest:
            on_first_byte()
            on_first_byte = None
        got = 0
        if "content-length" in headers:
            length = int(headers["content-length"])
            take = min(len(rest), length)
            got = take
            self.pending = rest[take:]
            if got < length:
                view, sock = self.view, self.sock
                first = on_first_byte
                while got < length:
                    n = sock.recv_into(view, min(len(view), length - got))
                    if n == 0:
                        raise HTTPError(f"body cut after {got} of {length} bytes")
                    if first is not None:
                        first()
                        first = None
                    got += n
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            got = self._read_chunked(rest, on_first_byte)
        else:
            raise HTTPError(f"status {status} without a length: not supported")
        return {"status": status, "bytes": got, "cache_status": headers.get("cache-status", ""),
                "connection": headers.get("connection", "")}

    def _read_chunked(self, data: bytes, on_first_byte) -> int:
        got = 0
        while True:
            while b"\r\n" not in data:
                data += self._recv()
            line, data = data.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while not data.startswith(b"\r\n") and b"\r\n\r\n" not in data:
                    data += self._recv()
                self.pending = data[2:] if data.startswith(b"\r\n") else data.split(b"\r\n\r\n", 1)[1]
                return got
            while len(data) < size + 2:
                data += self._recv()
            if on_first_byte is not None:
                on_first_byte()
                on_first_byte = None
            got += size
            data = data[size + 2:]


def run(spec: dict) -> dict:
    mode = spec["mode"]
    threads = int(spec.get("threads", 1))
    bufsize = int(spec.get("bufsize", 1 << 20))
    start_at = float(spec.get("start_at", time.time()))
    max_seconds = float(spec.get("max_seconds", 600))
    ctx = None
    if spec.get("tls"):
        ctx = ssl.create_default_context(cafile=spec["cafile"])
    hard_end = start_at + max_seconds
    results: list[list] = [[] for _ in range(threads)]
    errors: list[str] = []
    lock = threading.Lock()
    window: dict[str, float] = {}

    def err(msg: str) -> None:
        with lock:
            if len(errors) < 20:
                errors.append(msg)

    def wait_until(t: float) -> None:
        while True:
            d = t - time.time()
            if d <= 0:
                return
            time.sleep(min(d, 0.05))

    def stream_worker(i: int) -> None:
        wait_until(start_at)
        for _ in range(int(spec.get("count", 1))):
            if time.time() > hard_end:
                err("max_seconds reached")
                return
            c = Client(spec, ctx, bufsize)
            t0 = time.perf_counter()
            first: list[float] = []
            try:
                c.open()
                r = c.get(close=True, on_first_byte=lambda: first.append(time.perf_counter()))
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                err(f"{type(exc).__name__}: {exc}")
                return
            finally:
                c.close()
            t1 = time.perf_counter()
            r.update(start=t0, ttfb=(first[0] - t0) if first else None, elapsed=t1 - t0,
                     end_wall=time.time())
            results[i].append(r)

    measure_from = start_at + float(spec.get("warmup", 0))
    measure_to = measure_from + float(spec.get("duration", 5))

    def loop_worker(i: int, new_conn: bool) -> None:
        wait_until(start_at)
        out = results[i]
        c = Client(spec, ctx, bufsize)
        opened = False
        pc, now = time.perf_counter, time.time
        while True:
            wall = now()
            if wall >= measure_to or wall >= hard_end:
                break
            t0 = pc()
            try:
                if not opened or new_conn:
                    c.open()
                    opened = True
                r = c.get(close=new_conn)
                if r["status"] != 200:
                    err(f"status {r['status']}")
                if new_conn or r["connection"].lower() == "close":
                    c.close()
                    opened = False
            except Exception as exc:  # noqa: BLE001
                err(f"{type(exc).__name__}: {exc}")
                c.close()
                opened = False
                time.sleep(0.01)
                continue
            t1 = pc()
            if now() >= measure_from:
                out.append(t1 - t0)
        c.close()

    def small_worker() -> None:
        """All connections of this process on one selector (no GIL hand-offs between threads)."""
        pc, now = time.perf_counter, time.time
        sel = selectors.DefaultSelector()

        def connect(st: dict) -> None:
            c = st["c"]
            c.close()
            c.open()
            c.sock.setblocking(False)
            sel.register(c.sock, selectors.EVENT_READ, st)
            st["buf"] = b""

        def send(st: dict) -> None:
            st["t0"] = pc()
            sock, req = st["c"].sock, st["c"].request
            try:
                n = sock.send(req)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                n = 0
            if n < len(req):
                sock.setblocking(True)
                sock.sendall(req[n:])
                sock.setblocking(False)

        def reopen(st: dict, why: str) -> None:
            err(why)
            try:
                sel.unregister(st["c"].sock)
            except Exception:  # noqa: BLE001
                pass
            for _ in range(50):
                if now() >= measure_to:
                    return
                try:
                    connect(st)
                    send(st)
                    return
                except Exception as exc:  # noqa: BLE001
                    err(f"reconnect: {type(exc).__name__}: {exc}")
                    time.sleep(0.02)

        states = []
        for _ in range(threads):
            st = {"c": Client(spec, ctx, bufsize), "buf": b"", "t0": 0.0}
            try:
                connect(st)
            except Exception as exc:  # noqa: BLE001
                err(f"connect: {type(exc).__name__}: {exc}")
                continue
            states.append(st)
        wait_until(start_at)
        out = results[0]
        for st in states:
            send(st)
        while now() < measure_to and now() < hard_end and states:
            for key, _ in sel.select(timeout=0.5):
                st = key.data
                sock = st["c"].sock
                closed = False
                while True:
                    try:
                        data = sock.recv(262144)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        break
                    except OSError as exc:
                        data, closed = b"", True
                        err(f"{type(exc).__name__}: {exc}")
                    if not data:
                        closed = True
                        break
                    st["buf"] += data
                buf = st["buf"]
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    head = buf[:end].lower()
                    i = head.find(b"\r\ncontent-length:")
                    if i < 0:
                        reopen(st, "response without content-length")
                        continue
                    j = head.find(b"\r\n", i + 2)
                    length = int(head[i + 17: j if j >= 0 else len(head)])
                    total = end + 4 + length
                    if len(buf) >= total:
                        t1 = pc()
                        if not head.startswith(b"http/1.1 200"):
                            err(f"status {head[:40]!r}")
                        if now() >= measure_from:
                            out.append(t1 - st["t0"])
                        st["buf"] = buf[total:]
                        if b"\r\nconnection: close" in head:
                            reopen(st, "server closed the connection")
                            continue
                        send(st)
                        continue
                if closed:
                    reopen(st, "connection closed by server")
        for st in states:
            st["c"].close()
        sel.close()

    def cpu_probe() -> None:
        wait_until(measure_from)
        window["cpu0"], window["t0"] = cpu_seconds(), time.time()
        wait_until(measure_to)
        window["cpu1"], window["t1"] = cpu_seconds(), time.time()

    if mode == "stream":
        target, args = stream_worker, lambda i: (i,)
    elif mode == "small":
        target, args = small_worker, lambda i: ()
    elif mode == "tunnels":
        target, args = loop_worker, lambda i: (i, True)
    else:
        raise SystemExit(f"unknown mode {mode}")
    cpu_start = cpu_seconds()
    n_threads = 1 if mode == "small" else threads
    ts = [threading.Thread(target=target, args=args(i), daemon=True) for i in range(n_threads)]
    probe = None
    if mode != "stream":
        probe = threading.Thread(target=cpu_probe, daemon=True)
        probe.start()
    for t in ts:
        t.start()
    for t in ts:
        t.join(max(1.0, hard_end - time.time() + 5))
    if probe is not None:
        probe.join(max(1.0, hard_end - time.time() + 5))
    out: dict = {"errors": errors, "cpu_total": cpu_seconds() - cpu_start}
    if mode == "stream":
        out["records"] = [r for rs in results for r in rs]
    else:
        lat = [x for rs in results for x in rs]
        out["latencies"] = lat
        if "cpu1" in window:
            out["window"] = window["t1"] - window["t0"]
            out["cpu_window"] = window["cpu1"] - window["cpu0"]
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    json.dump(run(spec), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
