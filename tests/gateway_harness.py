"""Runs the real gateway (``python -m gateway serve``) as a subprocess for tests and benchmarks.

The gateway reaches the emulated upstream world only through its real settings:
``upstream.address_overrides`` (each upstream host → its loopback port) and
``upstream.ca_bundle`` (the world's test CA). Nothing in the gateway knows it is being tested.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_config(data_dir: Path, world=None, extra: Optional[dict] = None) -> dict:
    """A config for tests: loopback ports, quick retries, the world's overrides and CA."""
    cfg: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}",
                   "data_dir": str(data_dir), "drain_grace": "10s"},
        "upstream": {
            "connect_timeout": "3s", "read_timeout": "5s",
            "retry": {"attempts": 3, "base_delay": "0.05s", "max_delay": "0.5s",
                      "retry_after_min": "0.2s", "retry_after_max": "3s", "deadline": "30s"},
            "circuit": {"failure_threshold": 5, "open_for": "2s", "long_retry_after": "60s"},
        },
        "cache": {"min_free_space": 0},
        # prefetch would add upstream requests no client made; its tests switch it on
        "lifecycle": {"prefetch": {"enabled": False}},
        "logging": {"level": "info", "format": "json"},
    }
    if os.environ.get("GW_TEST_EVENT_LOOP"):
        # run the gateway suites on another event loop (e.g. uvloop) without editing tests
        cfg["server"]["event_loop"] = os.environ["GW_TEST_EVENT_LOOP"]
    if world is not None:
        cfg["upstream"]["ca_bundle"] = str(world.ca_pem)
        cfg["upstream"]["address_overrides"] = dict(world.address_overrides)
    return deep_merge(cfg, extra or {})


class _PortTaken(Exception):
    pass


class GatewayProcess:
    def __init__(self, workdir: Path, world=None, extra: Optional[dict] = None,
                 data_dir: Optional[Path] = None, fsize_limit: Optional[int] = None) -> None:
        #: RLIMIT_FSIZE for the gateway process: writes past it fail (EFBIG), like a full disk
        self.fsize_limit = fsize_limit
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(data_dir or self.workdir / "data")
        self.config = test_config(self.data_dir, world, extra)
        self.config_path = self.workdir / "gateway.yaml"
        self.log_path = self.workdir / "gateway.log"
        self.proc: Optional[subprocess.Popen] = None

    # -- addresses --------------------------------------------------------------------------
    @property
    def proxy_port(self) -> int:
        return int(self.config["server"]["listen"].rsplit(":", 1)[1])

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return "http://" + self.config["server"]["admin_listen"]

    @property
    def ca_pem(self) -> Path:
        return self.data_dir / "ca" / "ca.pem"

    def client_ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_pem))

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "GatewayProcess":
        for attempt in range(3):
            try:
                return self._start(timeout)
            except _PortTaken:
                # another process took the free port we picked (a race): pick new ones
                self.config["server"]["listen"] = f"127.0.0.1:{free_port()}"
                self.config["server"]["admin_listen"] = f"127.0.0.1:{free_port()}"
        return self._start(timeout)

    def _start(self, timeout: float) -> "GatewayProcess":
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)],
            cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=self._limits if self.fsize_limit else None)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "address already in use" in self.log_tail(5):
                    raise _PortTaken()
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"gateway not ready in {timeout}s:\n{self.log_tail()}")

    def _limits(self) -> None:  # runs in the child before exec
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize_limit, self.fsize_limit))

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (graceful drain) and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inspection -------------------------------------------------------------------------
    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "<no log>"

    def request_events(self, host: str, expect: int, timeout: float = 3.0) -> list[dict]:
        """Access-log lines for ``host`` (CONNECTs excluded), waiting (bounded) until at least
        ``expect`` are there: the gateway writes log lines in batches up to ~20 ms late."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [e for e in self.log_events() if e.get("event") == "request"
                     and e.get("host") == host and e.get("method") != "CONNECT"]
            if len(lines) >= expect or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def log_events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for fam in text_string_to_metric_families(self.metrics_text()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def status(self) -> dict:
        with urllib.request.urlopen(self.admin_url + "/api/status", timeout=5) as r:
            return json.loads(r.read())
