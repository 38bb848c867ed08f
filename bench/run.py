"""trivy-gateway benchmark: prints figures side by side with reference servers. Not a test.

    python bench/run.py                 # full: 200 MiB blob, 650 MiB big blob
    python bench/run.py --quick         # ~2 minute smoke run with small sizes
    python bench/run.py --save          # also write bench/results/<timestamp>.json
    python bench/run.py --profile       # extra pass: py-spy on the gateway per phase

Everything runs on 127.0.0.1: the emulated upstream world (tests/emulated, in a thread of this
process), the gateway (``python -m gateway serve`` via tests/gateway_harness.py), nginx (own
prefix/config/pid file in a temp dir), a bare aiohttp TLS server (the Python ceiling for small
responses), a bare ``asyncio.Protocol`` TLS server (bench/bare.py, the floor of the design), a
plain-HTTP aiohttp upstream, and load generators: Python processes (bench/loadgen.py) and, for
small hits, the Go client ``hey`` (Trivy is a Go program).
Every process started here is stopped before exit. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from procs import (CPUWindow, Nginx, PortProcess, RSSSampler, cpu_of,  # noqa: E402
                   run_loadgens)
from squid import Squid  # noqa: E402

MIB = 1024 * 1024
PLAIN_HOST = "plain-registry.bench"
PLAIN_REPO = "bench/plain"
BENCH_HOST = "bench.local"
POM_PATH = "org/example/bench/bench-lib/1.0.0/bench-lib-1.0.0.pom"


# ------------------------------------------------------------------------------ helpers
#: --pin: run_hey puts the server on core 0 and hey on core 1
PIN_CORES = False


def run_hey(hey: str, url: str, cafile: str, proxy: Optional[str], conns: int, seconds: float,
            server_pids: list[int]) -> dict:
    """One ``hey`` run (kept-alive connections, HTTP/1.1); the server CPU is taken over hey's
    whole run (its connection set-up included: 32 handshakes against thousands of requests)."""
    cmd = [hey, "-z", f"{seconds:g}s", "-c", str(conns), "-disable-compression"]
    if proxy:
        cmd += ["-x", proxy]
    if PIN_CORES and shutil.which("taskset"):
        # --pin: the server under test alone on core 0, the client on core 1
        for pid in server_pids:
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(pid)], capture_output=True)
        cmd = ["taskset", "-c", "1"] + cmd
    cpu = CPUWindow(server_pids, time.time(), None)
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 60,
                         env=dict(os.environ, SSL_CERT_FILE=cafile)).stdout
    server_cpu, _wall = cpu.finish()
    rate, lat, ok, bad = float("nan"), {}, 0, 0
    for line in out.splitlines():
        words = line.split()
        if line.strip().startswith("Requests/sec:"):
            rate = float(words[1])
        elif len(words) >= 4 and words[0].endswith("%") and words[1] == "in":
            lat[words[0]] = float(words[2]) * 1000
        elif words and words[0].startswith("[") and words[0].endswith("]") and "responses" in line:
            if words[0] == "[200]":
                ok += int(words[1])
            else:
                bad += int(words[1])
    if not ok:
        print(f"  ! hey {url}: no 200 answers; output tail: {out[-600:]!r}")
    return {"rate": rate, "p50_ms": lat.get("50%", float("nan")), "p99_ms": lat.get("99%", float("nan")),
            "n": ok, "bad": bad, "cpu_us_per_req": server_cpu / ok * 1e6 if ok else float("nan")}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[k]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(x: Optional[float], unit: str = "", digits: int = 1) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:,.{digits}f}{unit}"


def make_pom(size: int) -> bytes:
    head = (b'<?xml version="1.0" encoding="UTF-8"?>\n<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
            b"  <modelVersion>4.0.0</modelVersion>\n  <groupId>org.example.bench</groupId>\n"
            b"  <artifactId>bench-lib</artifactId>\n  <version>1.0.0</version>\n  <description>")
    tail = b"</description>\n</project>\n"
    filler = (b"benchmark payload " * (size // 18 + 1))[: size - len(head) - len(tail)]
    return head + filler + tail


def gateway_loop_description(pid: int) -> str:
    """Which event loop the gateway runs: uvloop if its extension is mapped, else stdlib."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        maps = ""
    if "uvloop" in maps:
        return "uvloop (uvloop extension mapped in the gateway process)"
    src = "uvloop referenced in gateway/" if any(
        "uvloop" in p.read_text(errors="ignore") for p in (REPO / "gateway").rglob("*.py")) else \
        "gateway/cli.py: asyncio.run, no uvloop"
    return f"stdlib asyncio (SelectorEventLoop/epoll; {src})"


class Env:
    """Everything started for one run; stop() stops all of it."""

    def __init__(self, args) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="trivy-gateway-bench-"))
        self.world = None
        self.gw = None
        self.nginx: Optional[Nginx] = None
        self.ceiling: Optional[PortProcess] = None
        self.bare: Optional[PortProcess] = None
        self.bare_gw_tls: Optional[PortProcess] = None
        self.squid: Optional[Squid] = None
        self.plain: Optional[PortProcess] = None

    def stop(self) -> None:
        for what, fn in (("gateway", lambda: self.gw and self.gw.stop()),
                         ("nginx", lambda: self.nginx and self.nginx.stop()),
                         ("ceiling", lambda: self.ceiling and self.ceiling.stop()),
                         ("bare", lambda: self.bare and self.bare.stop()),
                         ("bare, gateway TLS", lambda: self.bare_gw_tls and self.bare_gw_tls.stop()),
                         ("squid", lambda: self.squid and self.squid.stop()),
                         ("plain upstream", lambda: self.plain and self.plain.stop()),
                         ("world", lambda: self.world and self.world.stop())):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"  (stopping {what}: {exc})")
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)


# ------------------------------------------------------------------------------ the run
class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.env = Env(args)
        self.rows: list[dict] = []
        self.details: dict = {}
        self.procs = max(1, args.client_procs)

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        a, env = self.args, self.env
        self.details["load_at_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        os.environ.setdefault("TRIVY_EMU_ARTIFACT_DIR", str(a.artifact_dir or env.work / "artifacts"))
        from tests.emulated.certs import create_pki
        from tests.emulated.world import MAVEN, MIRROR, WorldThread
        from tests.gateway_harness import GatewayProcess, free_port

        t0 = time.monotonic()
        print(f"setup: building artifacts ({a.blob_mib} + {a.big_mib} + {a.cold_mib} MiB; "
              f"artifact dir {os.environ['TRIVY_EMU_ARTIFACT_DIR']}) ...", flush=True)
        world = WorldThread(env.work / "world", db_size_mib=0.05)
        env.world = world
        world.start(timeout=300)
        self.blob = world.call(self._publish(world, 901, a.blob_mib), timeout=900)
        self.big = world.call(self._publish(world, 902, a.big_mib), timeout=900)
        self.cold_blob = world.call(self._publish(world, 903, a.cold_mib), timeout=900)
        self.pom = make_pom(a.small_bytes)
        world.maven.put(POM_PATH, self.pom)
        self.mirror, self.maven = MIRROR, MAVEN
        print(f"setup: artifacts ready in {time.monotonic() - t0:.0f}s", flush=True)

        # reference PKI for nginx and the ceiling (ECDSA P-256, like the gateway's leaves)
        pki = create_pki(env.work / "bench-pki", hostnames=(BENCH_HOST,))
        self.ref_ca, self.ref_cert, self.ref_key = str(pki.ca_pem), pki.server_cert_pem, pki.server_key_pem
        self.ref_ca_key = str(pki.ca_key_pem)    # Squid mints its leaves with it
        www = env.work / "www"
        www.mkdir()
        os.symlink(self.blob.path, www / "blob.bin")
        os.symlink(self.big.path, www / "big.bin")
        (www / "small.pom").write_bytes(self.pom)
        env.nginx = Nginx(env.work / "nginx", www, pki.server_cert_pem, pki.server_key_pem,
                          workers=a.nginx_workers).start()
        env.ceiling = PortProcess([str(HERE / "ceiling.py"), str(www / "small.pom"),
                                   str(pki.server_cert_pem), str(pki.server_key_pem)],
                                  env.work / "ceiling.log").start()
        env.bare = PortProcess([str(HERE / "bare.py"), str(www / "small.pom"),
                                str(pki.server_cert_pem), str(pki.server_key_pem)],
                               env.work / "bare.log").start()
        env.bare_gw_tls = PortProcess([str(HERE / "bare.py"), str(www / "small.pom"),
                                       str(pki.server_cert_pem), str(pki.server_key_pem),
                                       "--gateway-tls"], env.work / "bare-gw-tls.log").start()
        env.plain = PortProcess([str(HERE / "plain_upstream.py"), PLAIN_REPO, str(self.blob.path)],
                                env.work / "plain-upstream.log").start()

        default = yaml.safe_load((REPO / "gateway" / "default_config.yaml").read_text())
        rules = list(default["policy"]["rules"])
        rules.insert(0, {"host": PLAIN_HOST, "action": "intercept", "ports": [80]})
        extra = {
            "policy": {"rules": rules},
            "upstream": {"address_overrides": {PLAIN_HOST: f"127.0.0.1:{env.plain.port}"},
                         "read_timeout": "60s"},
            "cache": {"oci": {"registries": list(default["cache"]["oci"]["registries"]) + [PLAIN_HOST]}},
            "server": {"drain_grace": "5s", "mirror_listen": f"127.0.0.1:{free_port()}"},
        }
        for item in a.set:  # --set logging.access_log=false (experiments; printed in the header)
            key, _, value = item.partition("=")
            node = extra
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = yaml.safe_load(value)
        env.gw = GatewayProcess(env.work / "gateway", world, extra).start(timeout=60)
        self.gw_pid = env.gw.proc.pid
        self.details["gateway_loop"] = gateway_loop_description(self.gw_pid)

    @staticmethod
    async def _publish(world, revision: int, size_mib: float):
        import asyncio
        loop = asyncio.get_running_loop()
        art = await loop.run_in_executor(None, lambda: world.world.publish_db(revision, size_mib=size_mib))
        return art.layer

    # -- client specs ----------------------------------------------------------------------------
    def gw_tls(self, host: str, path: str, **kw) -> dict:
        return dict(addr=["127.0.0.1", self.env.gw.proxy_port], connect=f"{host}:443", tls=True,
                    sni=host, cafile=str(self.env.gw.ca_pem), host=host, path=path, **kw)

    def gw_plain(self, host: str, path: str, **kw) -> dict:
        return dict(addr=["127.0.0.1", self.env.gw.proxy_port], connect=None, tls=False,
                    absolute=True, host=host, path=path, **kw)

    def gw_mirror(self, path: str, **kw) -> dict:
        """A scanner using the gateway as its registry mirror: plain HTTP to the mirror door."""
        host, port = self.env.gw.config["server"]["mirror_listen"].rsplit(":", 1)
        return dict(addr=[host, int(port)], connect=None, tls=False, host=f"{host}:{port}",
                    path=path, **kw)

    def ref_tls(self, port: int, path: str, **kw) -> dict:
        return dict(addr=["127.0.0.1", port], connect=None, tls=True, sni=BENCH_HOST,
                    cafile=self.ref_ca, host=BENCH_HOST, path=path, **kw)

    def ref_plain(self, port: int, path: str, **kw) -> dict:
        return dict(addr=["127.0.0.1", port], connect=None, tls=False, host=BENCH_HOST, path=path, **kw)

    @property
    def blob_path(self) -> str:
        return f"/v2/aquasec/trivy-db/blobs/{self.blob.digest}"

    @property
    def big_path(self) -> str:
        return f"/v2/aquasec/trivy-db/blobs/{self.big.digest}"

    @property
    def cold_path(self) -> str:
        return f"/v2/aquasec/trivy-db/blobs/{self.cold_blob.digest}"

    @property
    def plain_path(self) -> str:
        return f"/v2/{PLAIN_REPO}/blobs/{self.blob.digest}"

    @property
    def pom_path(self) -> str:
        return f"/maven2/{POM_PATH}"

    # -- primitives --------------------------------------------------------------------------------
    def streams(self, spec: dict, clients: int, server_pids: list[int], timeout: float,
                procs: int = 1, count: int = 1) -> dict:
        """``clients`` concurrent downloads (threads spread over ``procs`` processes)."""
        start_at = time.time() + 0.8
        per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        specs = [dict(spec, mode="stream", threads=n, start_at=start_at, count=count,
                      max_seconds=timeout) for n in per if n]
        cpu = CPUWindow(server_pids, start_at, None)
        res = run_loadgens(specs, timeout + 30)
        server_cpu, wall = cpu.finish()
        recs = [r for x in res for r in x.get("records", [])]
        errors = [e for x in res for e in x.get("errors", [])]
        client_cpu = sum(x.get("cpu_total", 0.0) for x in res)
        total_bytes = sum(r["bytes"] for r in recs)
        if recs:
            t_first = min(r["end_wall"] - r["elapsed"] for r in recs)
            span = max(r["end_wall"] for r in recs) - t_first
        else:
            span = float("nan")
        return {"records": recs, "errors": errors, "bytes": total_bytes, "span": span,
                "cpu_s_per_gib": server_cpu / (total_bytes / (1024 * MIB)) if total_bytes else float("nan"),
                "mib_s": total_bytes / MIB / span if recs and span > 0 else float("nan"),
                "client_cpu": client_cpu, "server_cpu": server_cpu, "server_wall": wall}

    def loop(self, spec: dict, mode: str, conns: int, server_pids: list[int], duration: float,
             warmup: float = 1.0) -> dict:
        procs = min(self.procs, conns)
        per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
        start_at = time.time() + 0.8
        specs = [dict(spec, mode=mode, threads=n, start_at=start_at, warmup=warmup,
                      duration=duration, bufsize=65536, max_seconds=duration + warmup + 30)
                 for n in per if n]
        cpu = CPUWindow(server_pids, start_at + warmup, start_at + warmup + duration)
        res = run_loadgens(specs, duration + warmup + 60)
        server_cpu, wall = cpu.finish()
        lat = [v for x in res for v in x.get("latencies", [])]
        window = max([x.get("window", duration) for x in res] or [duration])
        return {"rate": len(lat) / window if window else float("nan"),
                "p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000,
                "n": len(lat), "errors": [e for x in res for e in x.get("errors", [])],
                "client_cpu": sum(x.get("cpu_window", 0.0) for x in res) / window,
                "server_cpu": server_cpu / wall if wall else float("nan"),
                "server_cpu_s": server_cpu, "server_wall": wall,
                # CPU per request: robust against CPU stolen by other work on the machine
                "cpu_us_per_req": (server_cpu / wall) / (len(lat) / window) * 1e6
                if lat and wall and window else float("nan")}

    def alternate(self, candidates: list[tuple], mode: str, conns: int, *,
                  also: Optional[tuple[str, list[int]]] = None) -> dict:
        """Rounds alternating between servers (so drifting background load hits all of them);
        medians over rounds. ``also=(name, pids)``: the CPU of those processes (e.g. a Redis the
        servers share) per request of each round, reported as ``<name>_us_per_req`` (read around
        the round, so an upper bound)."""
        a = self.args
        rounds = max(1, a.runs)
        slice_s = max(2.0, a.duration / rounds)
        keys = ["rate", "p50_ms", "p99_ms", "client_cpu", "server_cpu", "cpu_us_per_req"]
        extra_key = f"{also[0]}_us_per_req" if also else None
        if extra_key:
            keys.append(extra_key)
        per: dict[str, list[dict]] = {name: [] for name, _, _ in candidates}
        for i in range(rounds):
            for name, spec, pids in candidates:
                c0 = cpu_of(also[1]) if also else 0.0
                r = self.loop(spec, mode, conns, pids() if callable(pids) else pids, slice_s)
                self.check_errors(f"{mode} {name}", r)
                extra = ""
                if also:
                    r[extra_key] = ((cpu_of(also[1]) - c0) / r["n"] * 1e6 if r["n"]
                                    else float("nan"))
                    extra = f"; {also[0]} {r[extra_key]:,.0f} us/req"
                per[name].append(r)
                print(f"  round {i + 1} {name}: {r['rate']:,.0f}/s p50 {r['p50_ms']:.2f} ms "
                      f"p99 {r['p99_ms']:.2f} ms (server CPU {r['server_cpu']:.0%}, "
                      f"{r['cpu_us_per_req']:,.0f} us CPU/req{extra}; client CPU "
                      f"{r['client_cpu']:.0%}) load {os.getloadavg()[0]:.2f}", flush=True)
        return {name: {**{k: med([r[k] for r in rs]) for k in keys},
                       "rates": [r["rate"] for r in rs]}
                for name, rs in per.items()}

    def check_errors(self, label: str, result: dict) -> None:
        if result.get("errors"):
            print(f"  ! {label}: {len(result['errors'])} client error(s), e.g. {result['errors'][:3]}")

    # -- phases ---------------------------------------------------------------------------------------
    def warm(self) -> None:
        a = self.args
        print("warm-up: filling the gateway cache (blob via TLS and plain HTTP, POM) ...", flush=True)
        for label, spec in (("tls blob", self.gw_tls(self.mirror, self.blob_path)),
                            ("plain blob", self.gw_plain(PLAIN_HOST, self.plain_path)),
                            ("pom", self.gw_tls(self.maven, self.pom_path))):
            for attempt in range(2):
                r = self.streams(spec, 1, [self.gw_pid], timeout=300)
                self.check_errors(f"warm {label}", r)
                rec = r["records"][0] if r["records"] else {}
                print(f"  {label}: status {rec.get('status')} {rec.get('bytes')} B "
                      f"Cache-Status: {rec.get('cache_status')}")
            if "hit" not in rec.get("cache_status", ""):
                print(f"  ! {label} is not a cache hit after warm-up; figures below are not hits")
        plain_log = (self.env.work / "plain-upstream.log").read_text().splitlines()
        print(f"  plain upstream access log: {plain_log}")
        # the big blob's cold fill with 16 clients: peak RSS while filling
        print(f"cold fill of the {a.big_mib} MiB blob with {a.rss_clients} clients "
              "(peak RSS sampled) ...", flush=True)
        with RSSSampler(self.gw_pid) as rss:
            r = self.streams(self.gw_tls(self.mirror, self.big_path), a.rss_clients, [self.gw_pid],
                             timeout=a.timeout, procs=self.procs)
        self.check_errors("big cold fill", r)
        self.details["rss_fill"] = {"peak_mib": rss.peak / MIB, "baseline_mib": rss.baseline / MIB,
                                    "mib_s": r["mib_s"], "clients": len(r["records"]),
                                    "samples": rss.samples}
        print(f"  peak RSS {rss.peak / MIB:.0f} MiB (before: {rss.baseline / MIB:.0f} MiB), "
              f"{len(r['records'])} clients, aggregate {r['mib_s']:.0f} MiB/s")

    def throughput(self, label: str, gw_spec: dict, ref_spec: dict, ref_pids: list[int],
                   size_mib: float, target: float, ref_name: str) -> None:
        a = self.args
        gw_runs, ref_runs = [], []
        for i in range(a.runs):
            for name, spec, pids, out in (("gateway", gw_spec, [self.gw_pid], gw_runs),
                                          (ref_name, ref_spec, ref_pids, ref_runs)):
                r = self.streams(spec, 1, pids, timeout=a.timeout)
                self.check_errors(f"{label} {name}", r)
                rec = r["records"][0] if r["records"] else None
                if rec and rec["bytes"] != int(size_mib * MIB) and name == "gateway":
                    pass
                out.append(r)
                print(f"  {label} run {i + 1} {name}: {r['mib_s']:.0f} MiB/s "
                      f"(server CPU {r['server_cpu'] / r['span']:.0%}, {r['cpu_s_per_gib']:.2f} s/GiB, client CPU "
                      f"{r['client_cpu'] / r['span']:.0%} of a core"
                      + (f", {rec.get('cache_status')}" if rec and name == "gateway" else "") + ")",
                      flush=True)
        g = med([r["mib_s"] for r in gw_runs])
        ref = med([r["mib_s"] for r in ref_runs])
        gs = sorted(gw_runs, key=lambda r: r["mib_s"])[len(gw_runs) // 2]
        g_cpu = med([r["cpu_s_per_gib"] for r in gw_runs])
        r_cpu = med([r["cpu_s_per_gib"] for r in ref_runs])
        self.rows.append(dict(
            metric=label, gateway=f"{g:,.0f} MiB/s", reference=f"{ref:,.0f} MiB/s ({ref_name})",
            ratio=g / ref if ref else float("nan"), target=f">= {target}x",
            ok=(g / ref >= target) if ref else None,
            note=f"median of {a.runs} (gw {', '.join(f'{r:.0f}' for r in sorted(x['mib_s'] for x in gw_runs))}; "
                 f"ref {', '.join(f'{r:.0f}' for r in sorted(x['mib_s'] for x in ref_runs))}); server CPU per GiB: "
                 f"gw {g_cpu:.2f} s, ref {r_cpu:.2f} s; gw CPU {gs['server_cpu'] / gs['span']:.0%}, "
                 f"client CPU {gs['client_cpu'] / gs['span']:.0%}"))
        self.details[label] = {"gateway_mib_s": [r["mib_s"] for r in gw_runs],
                               "reference_mib_s": [r["mib_s"] for r in ref_runs]}

    def small(self) -> None:
        a = self.args
        print(f"small responses: {len(self.pom)} B, {a.small_conns} kept-alive connections, "
              f"{a.duration:g}s each ...", flush=True)
        results = self.alternate([
            ("gateway", self.gw_tls(self.maven, self.pom_path), [self.gw_pid]),
            ("bare Protocol", self.ref_tls(self.env.bare.port, "/small.pom"), [self.env.bare.pid]),
            ("aiohttp ceiling", self.ref_tls(self.env.ceiling.port, "/small.pom"), [self.env.ceiling.pid]),
            ("nginx", self.ref_tls(self.env.nginx.tls_port, "/small.pom"), self.env.nginx.pids),
        ], "small", a.small_conns)
        # one connection: the unloaded service time (no queueing behind 31 other connections)
        single = {}
        for name, spec, pids in (
                ("gateway", self.gw_tls(self.maven, self.pom_path), [self.gw_pid]),
                ("aiohttp ceiling", self.ref_tls(self.env.ceiling.port, "/small.pom"),
                 [self.env.ceiling.pid])):
            r = self.loop(spec, "small", 1, pids, min(a.duration, 3.0))
            self.check_errors(f"small c=1 {name}", r)
            single[name] = r
            print(f"  {name}, 1 connection: {r['rate']:,.0f} req/s p50 {r['p50_ms']:.2f} ms "
                  f"p99 {r['p99_ms']:.2f} ms (server CPU {r['server_cpu']:.0%})", flush=True)
        results["c1"] = single
        g, c, n = results["gateway"], results["aiohttp ceiling"], results["nginx"]
        b = results["bare Protocol"]
        self.rows.append(dict(
            metric="small hits, 1 connection: p50 / p99",
            gateway=f"{single['gateway']['p50_ms']:.2f} / {single['gateway']['p99_ms']:.2f} ms",
            reference=f"{single['aiohttp ceiling']['p50_ms']:.2f} / "
                      f"{single['aiohttp ceiling']['p99_ms']:.2f} ms (ceiling)",
            ratio=None, target="(info)", ok=None,
            note=f"unloaded service time; gw {single['gateway']['rate']:,.0f} req/s vs ceiling "
                 f"{single['aiohttp ceiling']['rate']:,.0f} req/s on one connection"))
        self.rows.append(dict(
            metric=f"small {len(self.pom) // 1024} KiB hits, c={a.small_conns}, intercepted TLS",
            gateway=f"{g['rate']:,.0f} req/s", reference=f"{c['rate']:,.0f} req/s (aiohttp ceiling)",
            ratio=g["rate"] / c["rate"] if c["rate"] else float("nan"), target=">= 0.5x",
            ok=g["rate"] / c["rate"] >= 0.5 if c["rate"] else None,
            note=f"nginx {n['rate']:,.0f} req/s; gw CPU {g['server_cpu']:.0%}, "
                 f"client CPU {g['client_cpu']:.0%}"))
        self.rows.append(dict(
            metric="small hits latency p50 / p99", gateway=f"{g['p50_ms']:.2f} / {g['p99_ms']:.2f} ms",
            reference=f"{c['p50_ms']:.2f} / {c['p99_ms']:.2f} ms (ceiling)",
            ratio=None, target="p99 <= 10 ms", ok=g["p99_ms"] <= 10,
            note=f"nginx {n['p50_ms']:.2f} / {n['p99_ms']:.2f} ms"))
        self.rows.append(dict(
            metric="small hits: server CPU per request", gateway=f"{g['cpu_us_per_req']:,.0f} us",
            reference=f"{c['cpu_us_per_req']:,.0f} us (ceiling)",
            ratio=c["cpu_us_per_req"] / g["cpu_us_per_req"] if g["cpu_us_per_req"] else float("nan"),
            target="(info)", ok=None,
            note=f"ratio = ceiling/gateway (higher is better); nginx {n['cpu_us_per_req']:,.0f} us; "
                 f"bare Protocol {b['cpu_us_per_req']:,.0f} us; robust against CPU stolen by other work"))
        self.details["small"] = results
        self.small_go()

    # -- the Go client lane -------------------------------------------------------------------------
    def start_squid(self, hey: str) -> list[tuple]:
        """Squid ssl_bump as one more lane (when installed), its cache warmed with the POM."""
        if self.args.no_squid or not Squid.binary():
            print("  squid: not installed (apt-get install squid-openssl) or --no-squid; lane skipped")
            return []
        from tests.gateway_harness import free_port
        env = self.env
        _host, port = env.world.address_overrides[self.maven].rsplit(":", 1)
        try:
            env.squid = Squid(self.ref_ca, self.ref_ca_key, int(port), str(env.world.ca_pem),
                              self.maven, free_port()).start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"  squid: did not start ({str(exc)[-300:]}); lane skipped")
            return []
        lane = ("squid", f"https://{self.maven}{self.pom_path}", self.ref_ca,
                f"http://127.0.0.1:{env.squid.port}", env.squid.pids)
        for _ in range(2):                       # a miss, then hits (TCP_MEM_HIT)
            run_hey(hey, lane[1], lane[2], lane[3], 1, 1.0, lane[4]())
        return [lane]

    def small_go(self) -> None:
        """Small hits with ``hey`` (Go's net/http, as Trivy): CONNECT via ``-x`` for the gateway
        (and Squid), direct TLS for the references; rounds alternate; best round per server."""
        a = self.args
        hey = shutil.which("hey")
        if not hey:
            print("small hits, Go client: hey not found (apt-get install hey); lane skipped")
            return
        conns = a.small_conns
        print(f"small responses, Go client (hey -c {conns}), {a.duration:g}s each ...", flush=True)
        env = self.env
        squid_lane = self.start_squid(hey)
        lanes = [
            ("gateway", f"https://{self.maven}{self.pom_path}", str(env.gw.ca_pem),
             f"http://127.0.0.1:{env.gw.proxy_port}", lambda: [self.gw_pid]),
            ("bare Protocol", f"https://127.0.0.1:{env.bare.port}/small.pom", self.ref_ca, None,
             lambda: [env.bare.pid]),
            ("bare, gateway TLS", f"https://127.0.0.1:{env.bare_gw_tls.port}/small.pom",
             self.ref_ca, None, lambda: [env.bare_gw_tls.pid]),
            ("aiohttp ceiling", f"https://127.0.0.1:{env.ceiling.port}/small.pom", self.ref_ca, None,
             lambda: [env.ceiling.pid]),
            ("nginx", f"https://127.0.0.1:{env.nginx.tls_port}/small.pom", self.ref_ca, None,
             env.nginx.pids),
        ] + squid_lane
        if a.go_lanes:                           # quick A/B runs: only these lanes (and the rows
            keep = {n.strip() for n in a.go_lanes.split(",")}    # they need stay complete)
            keep |= {"gateway", "bare Protocol", "bare, gateway TLS"}
            lanes = [lane for lane in lanes if lane[0] in keep]
        rounds = max(1, a.runs)
        slice_s = max(2.0, a.duration / rounds)
        per: dict[str, list[dict]] = {name: [] for name, *_ in lanes}
        for i in range(rounds):
            for name, url, ca, proxy, pids in lanes:
                r = run_hey(hey, url, ca, proxy, conns, slice_s, pids())
                per[name].append(r)
                print(f"  round {i + 1} {name}: {r['rate']:,.0f}/s p50 {r['p50_ms']:.2f} ms "
                      f"p99 {r['p99_ms']:.2f} ms ({r['cpu_us_per_req']:,.1f} us CPU/req; "
                      f"{r['n']} ok, {r['bad']} not 200)", flush=True)
        # the best round per server (least CPU per request; its rate and latencies with it): on
        # this shared machine a slow spell (every process at several times its CPU per request
        # for seconds) can hit any round of any server, and noise only ever adds
        res = {name: dict(min(rs, key=lambda r: r["cpu_us_per_req"] if r["n"] else float("inf")))
               for name, rs in per.items()}
        nan = {"rate": float("nan"), "cpu_us_per_req": float("nan"), "p50_ms": float("nan"),
               "p99_ms": float("nan")}
        g, b = res["gateway"], res["bare Protocol"]
        c, n = res.get("aiohttp ceiling", nan), res.get("nginx", nan)
        sq = res.get("squid")
        self.rows.append(dict(
            metric=f"small hits, Go client c={conns}, intercepted TLS",
            gateway=f"{g['rate']:,.0f} req/s", reference=f"{b['rate']:,.0f} req/s (bare Protocol)",
            ratio=g["rate"] / b["rate"] if b["rate"] else float("nan"), target="(info)", ok=None,
            note=f"aiohttp ceiling {c['rate']:,.0f} req/s; nginx {n['rate']:,.0f} req/s"))
        self.rows.append(dict(
            metric="small hits, Go client: p50 / p99", gateway=f"{g['p50_ms']:.2f} / {g['p99_ms']:.2f} ms",
            reference=f"{b['p50_ms']:.2f} / {b['p99_ms']:.2f} ms (bare)", ratio=None,
            target="p99 <= 10 ms", ok=g["p99_ms"] <= 10))
        self.rows.append(dict(
            metric="small hits, Go client: server CPU per request",
            gateway=f"{g['cpu_us_per_req']:,.0f} us", reference=f"{b['cpu_us_per_req']:,.0f} us (bare Protocol)",
            ratio=g["cpu_us_per_req"] / b["cpu_us_per_req"] if b["cpu_us_per_req"] else float("nan"),
            target="<= 1.5x", ok=g["cpu_us_per_req"] <= 1.5 * b["cpu_us_per_req"],
            note=f"ratio = gateway/bare (lower is better); aiohttp ceiling {c['cpu_us_per_req']:,.0f} us, "
                 f"nginx {n['cpu_us_per_req']:,.0f} us"))
        bg = res.get("bare, gateway TLS")
        if bg is not None:
            # the same bare server over the gateway's TLS layer (bench/bare.py --gateway-tls):
            # what the gateway spends per request beyond TLS glue it shares with this one
            self.rows.append(dict(
                metric="small hits, Go client: CPU vs bare on the gateway's TLS",
                gateway=f"{g['cpu_us_per_req']:,.1f} us",
                reference=f"{bg['cpu_us_per_req']:,.1f} us (bare, gateway TLS)",
                ratio=g["cpu_us_per_req"] / bg["cpu_us_per_req"] if bg["cpu_us_per_req"] else float("nan"),
                target="(info)", ok=None,
                note=f"the issue's reference is the bare server on asyncio's TLS: "
                     f"{b['cpu_us_per_req']:,.1f} us"))
        if sq is not None:
            self.rows.append(dict(
                metric="small hits, Go client: CPU per request vs Squid",
                gateway=f"{g['cpu_us_per_req']:,.0f} us", reference=f"{sq['cpu_us_per_req']:,.0f} us (Squid)",
                ratio=g["cpu_us_per_req"] / sq["cpu_us_per_req"] if sq["cpu_us_per_req"] else float("nan"),
                target="<= 1.0x", ok=g["cpu_us_per_req"] <= sq["cpu_us_per_req"],
                note=f"Squid ssl_bump (rock store + memory cache) {sq['rate']:,.0f} req/s, "
                     f"p50 / p99 {sq['p50_ms']:.2f} / {sq['p99_ms']:.2f} ms; {Squid.version()}"))
        self.details["small_go"] = {name: dict(res[name], rounds=rs) for name, rs in per.items()}

    def tunnels(self) -> None:
        a = self.args
        print(f"new connections: {a.tunnel_conns} concurrent, {a.duration:g}s each ...", flush=True)
        results = self.alternate([
            ("gateway", self.gw_tls(self.maven, self.pom_path), [self.gw_pid]),
            ("aiohttp ceiling", self.ref_tls(self.env.ceiling.port, "/small.pom"), [self.env.ceiling.pid]),
            ("nginx", self.ref_tls(self.env.nginx.tls_port, "/small.pom"), self.env.nginx.pids),
        ], "tunnels", a.tunnel_conns)
        g, c, n = results["gateway"], results["aiohttp ceiling"], results["nginx"]
        self.rows.append(dict(
            metric="new intercepted tunnels (CONNECT+TLS+1 req)", gateway=f"{g['rate']:,.0f} /s",
            reference=f"{c['rate']:,.0f} /s (ceiling: TLS+1 req)",
            ratio=g["rate"] / c["rate"] if c["rate"] else float("nan"), target="(none)", ok=None,
            note=f"p50 {g['p50_ms']:.1f} ms p99 {g['p99_ms']:.1f} ms; nginx {n['rate']:,.0f} /s; server CPU "
                 f"per connection: gw {g['cpu_us_per_req']:,.0f} us, ceiling {c['cpu_us_per_req']:,.0f} us, "
                 f"nginx {n['cpu_us_per_req']:,.0f} us"))
        self.details["tunnels"] = results

    def rss(self) -> None:
        a = self.args
        print(f"peak RSS: {a.rss_clients} clients streaming the cached {a.big_mib} MiB blob ...",
              flush=True)
        with RSSSampler(self.gw_pid) as rss:
            r = self.streams(self.gw_tls(self.mirror, self.big_path), a.rss_clients, [self.gw_pid],
                             timeout=a.timeout, procs=self.procs)
        self.check_errors("rss hits", r)
        hits = sum(1 for x in r["records"] if "hit" in x.get("cache_status", ""))
        print(f"  peak {rss.peak / MIB:.0f} MiB (before {rss.baseline / MIB:.0f} MiB), {hits} hits, "
              f"aggregate {r['mib_s']:.0f} MiB/s, {rss.samples} samples")
        fill = self.details.get("rss_fill", {})
        self.rows.append(dict(
            metric=f"peak RSS, {a.rss_clients} clients x {a.big_mib} MiB cached", gateway=f"{rss.peak / MIB:.0f} MiB",
            reference="-", ratio=None, target="<= 150 MiB", ok=rss.peak / MIB <= 150,
            note=f"aggregate {r['mib_s']:.0f} MiB/s; during the cold fill: "
                 f"{fill.get('peak_mib', float('nan')):.0f} MiB"))
        self.details["rss_hits"] = {"peak_mib": rss.peak / MIB, "mib_s": r["mib_s"], "hits": hits}

    def cold(self) -> None:
        a = self.args
        world = self.env.world
        print(f"cold: {a.cold_clients} concurrent clients, uncached {a.cold_mib} MiB blob ...", flush=True)
        world.clear_log()
        with RSSSampler(self.gw_pid) as rss:
            r = self.streams(self.gw_tls(self.mirror, self.cold_path), a.cold_clients, [self.gw_pid],
                             timeout=a.timeout, procs=1)
        self.check_errors("cold", r)
        world.wait_idle(10)
        hexd = self.cold_blob.digest.split(":", 1)[1]
        gets = [e for e in world.requests(path_contains=hexd) if e.method == "GET"]
        print("  upstream access log for the blob (all hosts):")
        for line in world.log_summary(world.requests(path_contains=hexd)).splitlines():
            print(f"    {line}")
        recs = r["records"]
        leader = [x for x in recs if "collapsed" not in x.get("cache_status", "")]
        followers = [x for x in recs if "collapsed" in x.get("cache_status", "")]
        for x in sorted(recs, key=lambda x: x["start"]):
            print(f"  client: ttfb {x['ttfb'] * 1000:7.1f} ms, done {x['elapsed']:6.2f}s, "
                  f"{x['bytes'] / MIB:.0f} MiB, {x['cache_status']}")
        ok_bytes = all(x["bytes"] == self.cold_blob.size for x in recs) and len(recs) == a.cold_clients
        lt = med([x["ttfb"] for x in leader]) * 1000 if leader else float("nan")
        ft = [x["ttfb"] * 1000 for x in followers if x["ttfb"] is not None]
        first_done = min((x["elapsed"] for x in recs), default=float("nan"))
        self.rows.append(dict(
            metric=f"cold: {a.cold_clients} clients, {a.cold_mib} MiB uncached",
            gateway=f"{len(gets)} upstream GET", reference="-", ratio=None, target="1 upstream GET",
            ok=len(gets) == 1 and ok_bytes,
            note=f"all {len(recs)} complete: {ok_bytes}; total {r['span']:.2f}s; "
                 f"peak RSS {rss.peak / MIB:.0f} MiB"))
        self.rows.append(dict(
            metric="cold: time to first byte leader / followers",
            gateway=f"{lt:.0f} / {med(ft):.0f} ms (max {max(ft) if ft else float('nan'):.0f})",
            reference="-", ratio=None, target="followers stream before fill ends",
            ok=bool(ft) and max(ft) / 1000 < first_done,
            note=f"first client done at {first_done:.2f}s"))
        self.details["cold"] = {"upstream_gets": len(gets), "records": recs, "span": r["span"],
                                "peak_rss_mib": rss.peak / MIB}

    # -- profile pass ---------------------------------------------------------------------------------
    def profile(self) -> None:
        """py-spy on the gateway during one extra run of each phase (not part of the figures)."""
        pyspy = shutil.which("py-spy")
        if not pyspy:
            print("profile: py-spy not found (pip install py-spy)")
            return
        out_dir = HERE / "results"
        out_dir.mkdir(exist_ok=True)
        a = self.args
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        phases = [
            ("tls-stream", lambda: self.streams(self.gw_tls(self.mirror, self.blob_path), 1,
                                                [self.gw_pid], a.timeout, count=5)),
            ("plain-stream", lambda: self.streams(self.gw_plain(PLAIN_HOST, self.plain_path), 1,
                                                  [self.gw_pid], a.timeout, count=5)),
            ("small", lambda: self.loop(self.gw_tls(self.maven, self.pom_path), "small",
                                        a.small_conns, [self.gw_pid], a.duration)),
            ("tunnels", lambda: self.loop(self.gw_tls(self.maven, self.pom_path), "tunnels",
                                          a.tunnel_conns, [self.gw_pid], a.duration)),
        ]
        hey = shutil.which("hey")
        if hey:
            # what the issue measures: the Go client through CONNECT + intercepted TLS
            env = self.env
            phases.append(("small-go", lambda: run_hey(
                hey, f"https://{self.maven}{self.pom_path}", str(env.gw.ca_pem),
                f"http://127.0.0.1:{env.gw.proxy_port}", a.small_conns, a.duration,
                [self.gw_pid])))
        only = {p for p in a.profile_phases.split(",") if p}
        if only:
            phases = [ph for ph in phases if ph[0] in only]
        for name, fn in phases:
            raw = out_dir / f"profile-{stamp}-{name}.txt"
            spy = subprocess.Popen([pyspy, "record", "--pid", str(self.gw_pid), "--format", "raw",
                                    "--rate", os.environ.get("PYSPY_RATE", "250"), "--nonblocking", "-o", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            try:
                result = fn()
                if isinstance(result, dict) and "rate" in result:
                    print(f"  {name}: {result['rate']:,.0f}/s, {result['cpu_us_per_req']:,.0f} us "
                          f"CPU/req under py-spy ({result['n']} ok, {result['bad']} not 200)")
            finally:
                spy.send_signal(2)
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
            print(f"\nprofile {name}: {raw}")
            if raw.exists():
                print(summarize_profile(raw))

    # -- report --------------------------------------------------------------------------------------
    def report(self) -> None:
        a = self.args
        print()
        print("=" * 118)
        print(f"trivy-gateway benchmark  {_dt.datetime.now().isoformat(timespec='seconds')}  "
              f"{'(quick)' if a.quick else ''}")
        self.print_env()
        print("-" * 118)
        hdr = f"{'figure':50} {'gateway':22} {'reference':32} {'ratio':>6}  {'target':16} {'':4}"
        print(hdr)
        print("-" * 118)
        for r in self.rows:
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            ok = "" if r["ok"] is None else ("ok" if r["ok"] else "MISS")
            print(f"{r['metric'][:50]:50} {r['gateway'][:22]:22} {r['reference'][:32]:32} {ratio:>6}  "
                  f"{r['target'][:16]:16} {ok:4}")
            if r.get("note"):
                print(f"{'':52}{r['note']}")
        print("=" * 118)

    def print_env(self) -> None:
        a = self.args
        print(f"python {platform.python_version()} ({platform.python_implementation()}), "
              f"{ssl.OPENSSL_VERSION}, nginx {Nginx.version()} ({a.nginx_workers} worker)")
        print(f"gateway event loop: {self.details.get('gateway_loop', '?')}"
              + (f"; extra settings: {', '.join(a.set)}" if a.set else ""))
        print(f"machine: {os.cpu_count()} cores: clients and servers share them (client processes: "
              f"{self.procs}); figures are relative, compare ratios, not absolute numbers")
        print("load average (1/5/15 min) now: " + " ".join(f"{x:.2f}" for x in os.getloadavg())
              + f"; at start: {self.details.get('load_at_start', '?')}"
              + " (anything above what this run adds is other work on the machine)")
        print(f"sizes: blob {a.blob_mib} MiB, big {a.big_mib} MiB, cold {a.cold_mib} MiB, small "
              f"{a.small_bytes} B; {a.runs} run(s) per throughput figure (median), "
              f"{a.duration:g}s per request-rate figure")

    def save(self) -> Path:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        path = out / f"bench-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({"args": vars(self.args), "rows": self.rows,
                                    "details": self.details}, indent=1, default=str))
        return path


def summarize_profile(raw: Path, top: int = 14) -> str:
    """Top functions by own samples and by inclusive samples from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        # py-spy frames look like "func (path/file.py:line)"; drop line numbers to aggregate
        names = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") and ":" in f else f for f in frames]
        leaf = names[-1]
        own[leaf] = own.get(leaf, 0) + n
        for nm in set(names):
            incl[nm] = incl.get(nm, 0) + n
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; top by own time:"]
    for nm, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {n / total:6.1%}  {nm[:140]}")
    lines.append("  top by inclusive time (gateway/ frames):")
    for nm, n in sorted(((k, v) for k, v in incl.items() if "gateway/" in k),
                        key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {n / total:6.1%}  {nm[:140]}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~2 minute smoke run with small sizes")
    p.add_argument("--blob-mib", type=float, default=None, help="cached blob for the stream figures (200)")
    p.add_argument("--big-mib", type=float, default=None, help="blob for the RSS figure (650)")
    p.add_argument("--cold-mib", type=float, default=None, help="uncached blob for the cold figure (=blob)")
    p.add_argument("--small-bytes", type=int, default=4096)
    p.add_argument("--small-conns", type=int, default=32)
    p.add_argument("--tunnel-conns", type=int, default=8)
    p.add_argument("--rss-clients", type=int, default=16)
    p.add_argument("--cold-clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=None, help="seconds per request-rate figure, split over --runs alternating rounds (15)")
    p.add_argument("--runs", type=int, default=None, help="runs per throughput figure (5)")
    p.add_argument("--client-procs", type=int, default=2, help="load generator processes")
    p.add_argument("--nginx-workers", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600, help="bound for each download phase (s)")
    p.add_argument("--artifact-dir", type=Path, default=None,
                   help="keep generated blobs here between runs (default: a temp dir)")
    p.add_argument("--only", default="", help="comma list of phases: tls,plain,mirror,small,tunnels,rss,cold "
                   "(small-go: only small's Go client lane) "
                   "(none: only the --profile pass)")
    p.add_argument("--save", action="store_true", help="write bench/results/bench-<time>.json")
    p.add_argument("--profile", action="store_true", help="extra py-spy pass per phase")
    p.add_argument("--profile-phases", default="", metavar="LIST",
                   help="with --profile: only these of tls-stream,plain-stream,small,tunnels,small-go")
    p.add_argument("--keep", action="store_true", help="keep the temp work dir")
    p.add_argument("--no-squid", action="store_true", help="leave Squid out of the Go client lane")
    p.add_argument("--pin", action="store_true",
                   help="Go client lane: the server under test on core 0, hey on core 1 (steadier "
                        "A/B figures; the default shares both cores as the issue measures)")
    p.add_argument("--go-lanes", default="", metavar="LIST",
                   help="Go client lane: only the gateway, the bare server and these of "
                        "'aiohttp ceiling,nginx,squid' (quick A/B runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra gateway setting for experiments, e.g. logging.access_log=false")
    a = p.parse_args(argv)
    q = a.quick
    a.blob_mib = a.blob_mib if a.blob_mib is not None else (32 if q else 200)
    a.big_mib = a.big_mib if a.big_mib is not None else (64 if q else 650)
    a.cold_mib = a.cold_mib if a.cold_mib is not None else a.blob_mib
    a.duration = a.duration if a.duration is not None else (4 if q else 15)
    a.runs = a.runs if a.runs is not None else (2 if q else 5)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    global PIN_CORES
    PIN_CORES = args.pin
    bench = Bench(args)
    phases = ({"tls", "plain", "mirror", "small", "tunnels", "rss", "cold"} if not args.only
              else set(filter(None, args.only.split(","))) - {"none"})
    started = time.monotonic()
    try:
        bench.setup()
        bench.print_env()
        bench.warm()
        if "tls" in phases:
            print("stream, intercepted TLS vs nginx TLS ...", flush=True)
            bench.throughput(f"cached {args.blob_mib:g} MiB blob, intercepted TLS",
                             bench.gw_tls(bench.mirror, bench.blob_path),
                             bench.ref_tls(bench.env.nginx.tls_port, "/blob.bin"),
                             bench.env.nginx.pids(), args.blob_mib, 0.9, "nginx TLS")
        if "plain" in phases:
            print("stream, plain HTTP (absolute-form) vs nginx sendfile ...", flush=True)
            bench.throughput(f"cached {args.blob_mib:g} MiB blob, plain HTTP",
                             bench.gw_plain(PLAIN_HOST, bench.plain_path),
                             bench.ref_plain(bench.env.nginx.plain_port, "/blob.bin"),
                             bench.env.nginx.pids(), args.blob_mib, 0.8, "nginx sendfile")
        if "mirror" in phases:
            print("stream, mirror door (plain HTTP, the proxy door's cached blob) vs nginx "
                  "sendfile ...", flush=True)
            bench.throughput(f"cached {args.blob_mib:g} MiB blob, mirror door",
                             bench.gw_mirror(bench.blob_path),
                             bench.ref_plain(bench.env.nginx.plain_port, "/blob.bin"),
                             bench.env.nginx.pids(), args.blob_mib, 0.9, "nginx sendfile")
        if "small" in phases:
            bench.small()
        elif "small-go" in phases:
            bench.small_go()                     # the Go client lane alone (quick A/B runs)
        if "tunnels" in phases:
            bench.tunnels()
        if "rss" in phases:
            bench.rss()
        if "cold" in phases:
            bench.cold()
        bench.report()
        errors = [line for line in bench.env.gw.log_tail(100000).splitlines()
                  if '"level": "error"' in line or '"level":"error"' in line]
        print(f"gateway log: {len(errors)} error line(s)" + (f", last: {errors[-1][:300]}" if errors else ""))
        if args.save:
            print(f"saved {bench.save()}")
        if args.profile:
            bench.profile()
    finally:
        bench.env.stop()
        print(f"total wall time {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
