"""Scale-out benchmark (issue 12): workers on one machine and the per-replica blob paths. Not a test.

    python bench/scale.py                       # both phases, 64 MiB blobs, ~1.5 minutes
    python bench/scale.py --only workers        # small hits: server.workers 2 vs one process
    python bench/scale.py --only shared --blob-mib 200

Phases (both print a table like bench/run.py; nothing asserts, a missed target prints MISS):

- ``workers``: small cached responses (the 4 KiB POM through intercepted TLS, c=32, the same
  client lane as bench/run.py's "small hits": bench/loadgen.py ``small`` mode in
  ``--client-procs`` processes) against three gateways started side by side and measured in
  alternating rounds: today's single process, one worker with the Redis front
  (``cache.shared.redis_url``: the cost of sharing alone), and ``server.workers: 2`` (supervisor
  + 2 workers on one port, SO_REUSEPORT). Server CPU is psutil's user+sys summed over the
  supervisor and its children; Redis's CPU over the same rounds is printed on its own.
- ``shared``: cached blob throughput per replica over intercepted TLS (one client, as
  bench/run.py's figure 1). Replica A (Redis + S3 + peer endpoint) fills ``--s3-blobs`` blobs
  from the upstream and uploads them to S3; replica B (same Redis and bucket, empty local tier)
  then serves each of them once: read from S3 into its local fill while the client streams
  (checked: B's ``fleet_fills_total{role="s3"}``, no upstream GET). Then B's local-tier hits,
  alternating with today's single process serving the same blob from its cache.

Real components on 127.0.0.1 only: the emulated upstream world (a thread), ``redis-server``
(``--save '' --appendonly no``) and SeaweedFS ``weed mini`` (every port pinned to a free loopback
port, credentials required) from tests/scale_support.py, the gateways via
tests/gateway_harness.GatewayProcess. Every process is stopped by its PID before exit.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from procs import cpu_of  # noqa: E402
from run import MIB, POM_PATH, Bench, make_pom, med  # noqa: E402

S3_KEY, S3_SECRET = "bench-access-key", "bench-secret-key-0123456789"


def tree_pids(pid: int) -> list[int]:
    """A gateway's processes: the supervisor and every worker (psutil children, recursive)."""
    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.Error:
        return [pid]


def mibs(runs: list[dict]) -> str:
    return ", ".join(f"{r['mib_s']:.0f}" for r in runs)


def worker_metric(gw, i: int, name: str) -> float:
    """Sum of ``name`` on worker ``i``'s admin port (admin_listen + i)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    host, port = gw.config["server"]["admin_listen"].rsplit(":", 1)
    with urllib.request.urlopen(f"http://{host}:{int(port) + i}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(smp.value for fam in text_string_to_metric_families(text)
               for smp in fam.samples if smp.name == name)


def consecutive_free_ports(n: int) -> int:
    """A port p with p .. p+n-1 free on 127.0.0.1 (worker i's admin port is admin_listen + i)."""
    import socket

    from tests.gateway_harness import free_port
    for _ in range(100):  # bounded
        p = free_port()
        socks = []
        try:
            for i in range(1, n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


class ScaleBench(Bench):
    """Reuses bench/run.py's primitives (loop, streams, alternate, report) with its own setup."""

    def __init__(self, args) -> None:
        super().__init__(args)
        self.gws: dict = {}
        self.redis = None
        self.s3 = None

    # -- setup ------------------------------------------------------------------------------
    def setup(self, phases: set[str]) -> None:
        a, env = self.args, self.env
        self.details["load_at_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        os.environ.setdefault("TRIVY_EMU_ARTIFACT_DIR", str(a.artifact_dir or env.work / "artifacts"))
        from tests.emulated.world import MAVEN, MIRROR, WorldThread
        from tests.scale_support import RedisServer, SeaweedS3

        self.mirror, self.maven = MIRROR, MAVEN
        t0 = time.monotonic()
        env.world = WorldThread(env.work / "world", db_size_mib=0.05)
        env.world.start(timeout=300)
        self.pom = make_pom(a.small_bytes)
        env.world.maven.put(POM_PATH, self.pom)
        self.blobs = []
        if "shared" in phases:
            print(f"setup: {a.s3_blobs} blob(s) of {a.blob_mib:g} MiB ...", flush=True)
            self.blobs = [env.world.call(self._publish(env.world, 1200 + i, a.blob_mib), timeout=900)
                          for i in range(a.s3_blobs)]
        self.redis = RedisServer(env.work / "redis").start()
        if "shared" in phases:
            self.s3 = SeaweedS3(env.work / "s3", S3_KEY, S3_SECRET).start()
            # the gateways get the credentials the AWS SDK way (their environment)
            os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = S3_KEY, S3_SECRET
        print(f"setup: world, redis (pid {self.redis.proc.pid})"
              + (f", weed mini (pid {self.s3.proc.pid})" if self.s3 else "")
              + f" ready in {time.monotonic() - t0:.0f}s", flush=True)

    def start_gateway(self, name: str, extra: dict, workers: int = 1):
        from tests.gateway_harness import GatewayProcess

        base = {"server": {"drain_grace": "5s"}, "upstream": {"read_timeout": "60s"}}
        if workers > 1:
            admin = consecutive_free_ports(workers)
            base["server"].update(workers=workers, admin_listen=f"127.0.0.1:{admin}")
        cfg = {**base, **extra, "server": {**base["server"], **extra.get("server", {})}}
        gw = GatewayProcess(self.env.work / name, self.env.world, cfg).start(timeout=60)
        if workers > 1:  # start() waited for worker 0's admin port; the others too (bounded)
            import urllib.request
            host, port = gw.config["server"]["admin_listen"].rsplit(":", 1)
            for i in range(1, workers):
                deadline = time.monotonic() + 60
                while True:
                    try:
                        with urllib.request.urlopen(f"http://{host}:{int(port) + i}/readyz",
                                                    timeout=1) as r:
                            if r.status == 200:
                                break
                    except OSError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name}: worker {i} not ready in 60s")
                    time.sleep(0.1)
        self.gws[name] = gw
        print(f"  {name}: pids {tree_pids(gw.proc.pid)}", flush=True)
        return gw

    def shared_cfg(self, s3: bool) -> dict:
        from tests.gateway_harness import free_port
        shared: dict = {"redis_url": self.redis.url, "lease_ttl": "15s",
                        "peer_listen": f"127.0.0.1:{free_port()}"}
        if s3:
            shared["s3"] = {"endpoint": self.s3.endpoint, "bucket": "trivy-gateway-bench",
                            "part_size": "8MiB"}
        return {"cache": {"shared": shared}}

    def stop_all(self) -> None:
        for name, gw in self.gws.items():
            try:
                gw.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"  (stopping {name}: {exc})")
        for what in (self.s3, self.redis):
            if what is not None:
                try:
                    what.stop()
                except Exception as exc:  # noqa: BLE001
                    print(f"  (stopping {what}: {exc})")
        self.env.stop()

    # -- client specs ----------------------------------------------------------------------
    @staticmethod
    def tls_spec(gw, host: str, path: str) -> dict:
        return dict(addr=["127.0.0.1", gw.proxy_port], connect=f"{host}:443", tls=True, sni=host,
                    cafile=str(gw.ca_pem), host=host, path=path)

    def one(self, gw, host: str, path: str) -> dict:
        r = self.streams(self.tls_spec(gw, host, path), 1, tree_pids(gw.proc.pid), self.args.timeout)
        self.check_errors(f"GET {path}", r)
        return r["records"][0] if r["records"] else {}

    # -- phase 1: workers ------------------------------------------------------------------
    def workers(self) -> None:
        a = self.args
        print("workers: starting today's single process, one worker + Redis, "
              f"server.workers: {a.workers} + Redis ...", flush=True)
        single = self.start_gateway("single", {})
        one_redis = self.start_gateway("one-redis", self.shared_cfg(s3=False))
        multi = self.start_gateway("workers", self.shared_cfg(s3=False), workers=a.workers)
        for gw in (single, one_redis, multi):
            for _ in range(2):
                rec = self.one(gw, self.maven, f"/maven2/{POM_PATH}")
            print(f"  warm {gw.workdir.name}: {rec.get('status')} {rec.get('cache_status')}")
        cands = [(name, self.tls_spec(gw, self.maven, f"/maven2/{POM_PATH}"),
                  (lambda g=gw: tree_pids(g.proc.pid)))
                 for name, gw in (("single process", single), ("1 worker + redis", one_redis),
                                  (f"{a.workers} workers + redis", multi))]
        redis_pid = self.redis.proc.pid
        redis0, wall0 = cpu_of([redis_pid]), time.time()
        res = self.alternate(cands, "small", self.args.small_conns, also=("redis", [redis_pid]))
        s, o, m = (res[n] for n, _, _ in cands)
        self.details["workers"] = res
        ratio = m["rate"] / s["rate"] if s["rate"] else float("nan")
        self.rows.append(dict(
            metric=f"small 4 KiB hits, c={a.small_conns}, {a.workers} workers",
            gateway=f"{m['rate']:,.0f} req/s", reference=f"{s['rate']:,.0f} req/s (1 process)",
            ratio=ratio, target=">= 1.6x", ok=ratio >= 1.6 and m["p99_ms"] <= s["p99_ms"] * 1.1,
            note=f"1 worker + redis {o['rate']:,.0f} req/s; server CPU: {a.workers} workers "
                 f"{m['server_cpu']:.0%}, 1 process {s['server_cpu']:.0%}; client CPU "
                 f"{m['client_cpu']:.0%} / {s['client_cpu']:.0%} of a core"))
        # what the machine allows: every request costs server + client CPU on the same cores
        client_us = (m["client_cpu"] / m["rate"] * 1e6) if m["rate"] else float("nan")
        cap = 1e6 * (os.cpu_count() or 1) / (m["cpu_us_per_req"] + client_us)
        one_core = 1e6 / s["cpu_us_per_req"]  # one process can use one core at most
        self.rows.append(dict(
            metric="  scaling per server core", gateway=f"{m['rate'] / m['server_cpu']:,.0f} req/s/core",
            reference=f"{s['rate'] / s['server_cpu']:,.0f} req/s/core",
            ratio=(m["rate"] / m["server_cpu"]) / (s["rate"] / s["server_cpu"]), target="(info)", ok=None,
            note=f"client {client_us:.0f} us + server {m['cpu_us_per_req']:.0f} us per request: "
                 f"{os.cpu_count()} cores saturate at ~{cap:,.0f} req/s with the load generator on "
                 f"them = {cap / one_core:.2f}x one process on a full core ({one_core:,.0f} req/s)"))
        self.rows.append(dict(
            metric="  latency p50 / p99", gateway=f"{m['p50_ms']:.2f} / {m['p99_ms']:.2f} ms",
            reference=f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f} ms", ratio=None,
            target="same p99", ok=None,
            note=f"1 worker + redis {o['p50_ms']:.2f} / {o['p99_ms']:.2f} ms"))
        self.rows.append(dict(
            metric="  server CPU per request", gateway=f"{m['cpu_us_per_req']:,.0f} us",
            reference=f"{s['cpu_us_per_req']:,.0f} us", ratio=None, target="(info)", ok=None,
            note=f"1 worker + redis {o['cpu_us_per_req']:,.0f} us; redis-server "
                 f"{m['redis_us_per_req']:,.0f} us / {o['redis_us_per_req']:,.0f} us per request "
                 f"({a.workers} workers / 1 worker); sum over supervisor + workers"))
        print(f"  redis-server CPU over the phase: {cpu_of([redis_pid]) - redis0:.2f} s in "
              f"{time.time() - wall0:.0f} s", flush=True)
        split = [worker_metric(multi, i, "trivy_gateway_requests_total") for i in range(a.workers)]
        self.details["requests_per_worker"] = split
        print(f"  requests served per worker over the phase (SO_REUSEPORT spread): "
              f"{' / '.join(f'{x:,.0f}' for x in split)}", flush=True)
        for gw in (single, one_redis, multi):
            gw.stop()

    # -- phase 2: shared (S3 and the local tier) -------------------------------------------
    def shared(self) -> None:
        a = self.args
        world = self.env.world
        print("shared: replica A (leader), replica B (reads from S3), today's single process ...",
              flush=True)
        ra = self.start_gateway("replica-a", self.shared_cfg(s3=True))
        rb = self.start_gateway("replica-b", self.shared_cfg(s3=True))
        single = self.start_gateway("single-blob", {})
        paths = [f"/v2/aquasec/trivy-db/blobs/{b.digest}" for b in self.blobs]
        for p in paths:  # A fills from the upstream and uploads to S3
            rec = self.one(ra, self.mirror, p)
            print(f"  A fill {p[-12:]}: {rec.get('bytes', 0) / MIB:.0f} MiB "
                  f"{rec.get('cache_status')}", flush=True)
        want = sum(b.size for b in self.blobs)
        deadline = time.monotonic() + 300
        while ra.metric("trivy_gateway_shared_store_bytes_total", direction="upload") < want:
            if time.monotonic() > deadline:
                print("  ! A's S3 uploads did not finish within 300 s")
                break
            time.sleep(0.2)
        world.clear_log()
        s3_runs = []
        for p, b in zip(paths, self.blobs):
            before = rb.metric("trivy_gateway_fleet_fills_total", role="s3")
            weed0 = cpu_of(tree_pids(self.s3.proc.pid))
            r = self.streams(self.tls_spec(rb, self.mirror, p), 1, [rb.proc.pid], a.timeout)
            self.check_errors("B from S3", r)
            rec = r["records"][0] if r["records"] else {}
            via_s3 = rb.metric("trivy_gateway_fleet_fills_total", role="s3") - before
            ok_bytes = rec.get("bytes") == b.size
            r["weed_s_per_gib"] = (cpu_of(tree_pids(self.s3.proc.pid)) - weed0) / (b.size / (1024 * MIB))
            s3_runs.append(r)
            print(f"  B from S3: {r['mib_s']:.0f} MiB/s ({r['cpu_s_per_gib']:.2f} s CPU/GiB in the "
                  f"replica, weed mini {r['weed_s_per_gib']:.2f} s/GiB; s3 fills +{via_s3:.0f}; bytes ok {ok_bytes}; {rec.get('cache_status')}) "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        ups = [e for e in world.requests(path_contains="/blobs/") if e.method == "GET"]
        s3_mib = med([r["mib_s"] for r in s3_runs])
        self.rows.append(dict(
            metric=f"cached {a.blob_mib:g} MiB blob, replica reads S3", gateway=f"{s3_mib:,.0f} MiB/s",
            reference="-", ratio=None, target="(reported)", ok=None,
            note=f"runs {mibs(s3_runs)} MiB/s; upstream GETs "
                 f"during them: {len(ups)}; replica CPU per GiB "
                 f"{med([r['cpu_s_per_gib'] for r in s3_runs]):.2f} s, weed mini "
                 f"{med([r['weed_s_per_gib'] for r in s3_runs]):.2f} s"))
        # single process: warm (fill + one hit)
        for _ in range(2):
            rec = self.one(single, self.mirror, paths[0])
        print(f"  single process warm: {rec.get('cache_status')}", flush=True)
        rec = self.one(rb, self.mirror, paths[0])
        print(f"  replica B local: {rec.get('cache_status')}", flush=True)
        # run.py's figure 1 with replica B as "gateway" and today's process as the reference
        self.gw_pid = rb.proc.pid
        self.throughput(f"cached {a.blob_mib:g} MiB blob, replica B's local tier",
                        self.tls_spec(rb, self.mirror, paths[0]),
                        self.tls_spec(single, self.mirror, paths[0]), [single.proc.pid],
                        a.blob_mib, 0.9, "1 process")

    def print_env(self) -> None:
        a = self.args
        print(f"machine: {os.cpu_count()} cores shared by clients, gateways, redis-server, weed mini; "
              f"client processes {self.procs}")
        print("load average (1/5/15 min) now: " + " ".join(f"{x:.2f}" for x in os.getloadavg())
              + f"; at start: {self.details.get('load_at_start', '?')}")
        print(f"blob {a.blob_mib:g} MiB x {a.s3_blobs}; small {a.small_bytes} B, c={a.small_conns}; "
              f"{a.runs} round(s), {a.duration:g}s per request-rate figure")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma list of phases: workers,shared")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--blob-mib", type=float, default=64)
    p.add_argument("--s3-blobs", type=int, default=2, help="blobs read from S3 (one run each)")
    p.add_argument("--small-bytes", type=int, default=4096)
    p.add_argument("--small-conns", type=int, default=32)
    p.add_argument("--duration", type=float, default=9, help="seconds per candidate, split over --runs rounds")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--client-procs", type=int, default=2, help="load generator processes")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--artifact-dir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the temp work dir")
    p.set_defaults(quick=False)  # read by run.py's report()
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    phases = set(filter(None, args.only.split(","))) or {"workers", "shared"}
    bench = ScaleBench(args)
    started = time.monotonic()
    try:
        bench.setup(phases)
        bench.print_env()
        if "workers" in phases:
            bench.workers()
        if "shared" in phases:
            bench.shared()
        bench.report()  # run.py's table (its header and this class's print_env)
    finally:
        bench.stop_all()
        print(f"total wall time {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
