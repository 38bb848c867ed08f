"""The emulated upstream world: one TLS listener per upstream host.

Async::

    async with World(tmp_path) as w:
        w.port("ghcr.io"); w.address_overrides; w.ca_pem

Sync (pytest without asyncio)::

    wt = WorldThread(tmp_path); wt.start()
    try: ...
    finally: wt.stop()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Iterable, TypeVar

from .accesslog import AccessLog, LogEntry
from .artifacts import (
    CUSTOM_CHECK_ID,
    MAVEN_POMS,
    ArtifactStore,
    OciArtifact,
)
from .certs import EMULATED_HOSTS, TestPKI, create_pki
from .faults import Fault, FaultBook
from .httpserver import HostServer
from .services import BlobCDN, GitHub, Maven, Registry, VersionCheck, oci_error_body, vex_repository_manifest

T = TypeVar("T")

MIRROR = "mirror.gcr.io"
GHCR = "ghcr.io"
CDN = "pkg-containers.githubusercontent.com"
API_GITHUB = "api.github.com"
RAW_GITHUB = "raw.githubusercontent.com"
GITHUB = "github.com"
CODELOAD = "codeload.github.com"
MAVEN = "repo.maven.apache.org"
CHECK = "check.trivy.dev"
#: a private registry on a non-default port (same artifacts as mirror.gcr.io, same repositories)
PORTED = "registry.test:5443"

# artifact kind -> (mirror.gcr.io repository, ghcr.io repository, tag)
REPOSITORIES: dict[str, tuple[str, str, str]] = {
    "db": ("aquasec/trivy-db", "aquasecurity/trivy-db", "2"),
    "javadb": ("aquasec/trivy-java-db", "aquasecurity/trivy-java-db", "1"),
    "checks": ("aquasec/trivy-checks", "aquasecurity/trivy-checks", "2"),
}

GHCR_TOOMANY = "retry-after: 35.852µs, allowed: 44000/minute"


class World:
    """Emulates every upstream Trivy 0.76 talks to, on 127.0.0.1."""

    hosts: tuple[str, ...] = EMULATED_HOSTS

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        db_size_mib: float | None = None,
        artifacts: ArtifactStore | None = None,
        log_path: str | os.PathLike[str] | None = None,
        strict_host: bool = True,
    ) -> None:
        self._own_tmp = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="trivy-emu-world-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.artifacts = artifacts or ArtifactStore.shared()
        self.db_size_mib = db_size_mib
        self.log = AccessLog(log_path)
        self.faults = FaultBook()
        self.strict_host = strict_host
        self.pki: TestPKI | None = None
        self._conn_ids = itertools.count(1)
        self._conn_lock = threading.Lock()
        self._servers: dict[str, HostServer] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        secret = os.urandom(32)
        self.cdn = BlobCDN(CDN, secret + b"cdn")
        self.mirror = Registry(MIRROR, "/v2/token", secret + b"gcr")
        self.ghcr = Registry(GHCR, "/token", secret + b"ghcr", cdn=self.cdn, ping_scope="repository:user/image:pull")
        self.ported = Registry(PORTED, "/v2/token", secret + b"ported")
        self.github = GitHub()
        self.maven = Maven(MAVEN_POMS)
        self.version_check = VersionCheck()
        self.published: dict[str, OciArtifact] = {}
        self._vex_revision = 0

    # ------------------------------------------------------------ lifecycle
    def _next_conn(self) -> int:
        with self._conn_lock:
            return next(self._conn_ids)

    async def start(self) -> "World":
        if self._started:
            return self
        self._loop = asyncio.get_running_loop()
        self.pki = create_pki(self.workdir / "pki")
        # build artifacts off the loop (the big DB takes a couple of seconds once)
        await self._loop.run_in_executor(None, self._publish_initial)
        handlers = {
            MIRROR: self.mirror.handle,
            GHCR: self.ghcr.handle,
            CDN: self.cdn.handle,
            API_GITHUB: self.github.api,
            RAW_GITHUB: self.github.raw,
            GITHUB: self.github.web,
            CODELOAD: self.github.codeload,
            MAVEN: self.maven.handle,
            CHECK: self.version_check.handle,
            PORTED: self.ported.handle,
        }
        ctx = self.pki.server_ssl_context()

        def _sni(sslobj, name, _ctx):  # remember the SNI on the SSL object
            try:
                sslobj._emu_sni = name
            except Exception:
                pass
            return None

        ctx.sni_callback = _sni
        try:
            for host in self.hosts:
                srv = HostServer(host, handlers[host], ctx, self.log, self.faults, self._next_conn,
                                 strict_host=self.strict_host)
                await srv.start()
                self._servers[host] = srv
        except BaseException:
            await self.stop()
            raise
        self._started = True
        return self

    def _publish_initial(self) -> None:
        self.publish("db", self.artifacts.trivy_db(size_mib=self.db_size_mib))
        self.publish("javadb", self.artifacts.java_db())
        self.publish("checks", self.artifacts.checks_bundle())
        self.publish_vex(1)

    async def stop(self) -> None:
        servers = list(self._servers.values())
        for s in servers:
            await s.stop()
        self._started = False
        if self._own_tmp:  # a workdir we created ourselves is removed
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> "World":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # ------------------------------------------------------------ addresses
    @property
    def ca_pem(self) -> Path:
        assert self.pki is not None, "world not started"
        return self.pki.ca_pem

    def port(self, host: str) -> int:
        return self._servers[host].port

    @property
    def address_overrides(self) -> dict[str, str]:
        """host -> "127.0.0.1:port" (stable for the world's lifetime)."""
        return {h: f"127.0.0.1:{s.port}" for h, s in self._servers.items()}

    def url(self, host: str, path: str = "/") -> str:
        return f"https://{host}{path}"

    # ----------------------------------------------------------- publishing
    def publish(self, kind: str, artifact: OciArtifact,
                registries: Iterable[str] = (MIRROR, GHCR, PORTED)) -> str:
        """Publish *artifact* as the tag of *kind* ("db", "javadb", "checks")
        on every registry (identical bytes/digests; registry.test:5443 uses mirror.gcr.io's
        repository names). Returns manifest digest."""
        mirror_repo, ghcr_repo, tag = REPOSITORIES[kind]
        regs = set(registries)
        if MIRROR in regs:
            self.mirror.publish(mirror_repo, tag, artifact)
        if GHCR in regs:
            self.ghcr.publish(ghcr_repo, tag, artifact)
        if PORTED in regs:
            self.ported.publish(mirror_repo, tag, artifact)
        self.published[kind] = artifact
        return artifact.manifest_digest

    def publish_db(self, revision: int, size_mib: float | None = None, **kw: Any) -> OciArtifact:
        """Build (blocking) and publish a new trivy-db version (new digest)."""
        art = self.artifacts.trivy_db(revision=revision, size_mib=self.db_size_mib if size_mib is None else size_mib, **kw)
        self.publish("db", art)
        return art

    def publish_java_db(self, revision: int, **kw: Any) -> OciArtifact:
        art = self.artifacts.java_db(revision=revision, **kw)
        self.publish("javadb", art)
        return art

    def publish_checks(self, revision: int, **kw: Any) -> OciArtifact:
        art = self.artifacts.checks_bundle(revision=revision, **kw)
        self.publish("checks", art)
        return art

    def publish_vex(self, revision: int, update_interval: str | None = None) -> str:
        """Publish a VEX Hub archive revision; returns its (strong) ETag."""
        self.github.set_archive(self.artifacts.vex_archive(revision))
        if update_interval is not None:
            self.github.set_manifest(vex_repository_manifest(update_interval))
        self._vex_revision = revision
        return self.github.archive_etag

    def digest(self, kind: str, which: str = "manifest") -> str:
        art = self.published[kind]
        return art.manifest_digest if which == "manifest" else art.layer.digest

    @property
    def custom_check_id(self) -> str:
        return CUSTOM_CHECK_ID

    # ---------------------------------------------------------- access log
    def requests(self, host: str | None = None, method: str | None = None, path_contains: str | None = None,
                 **kw: Any) -> list[LogEntry]:
        return self.log.query(host=host, method=method, path_contains=path_contains, **kw)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block (bounded) until every logged request is done; True if so."""
        deadline = time.monotonic() + timeout
        while True:
            if all(e.done for e in self.log.entries()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def clear_log(self) -> None:
        self.log.clear()

    def log_to(self, path: str | os.PathLike[str] | None) -> None:
        self.log.set_jsonl_path(path)

    def log_summary(self, entries: list[LogEntry] | None = None) -> str:
        return self.log.summary(entries)

    # ---------------------------------------------------------------- faults
    def add_fault(self, host: str, kind: str, path: str | None = None, *, times: int | None = 1,
                  method: str | None = None, **params: Any) -> Fault:
        self._check_host(host)
        return self.faults.add(Fault(host, kind, path, method, times, params))

    def clear_faults(self, host: str | None = None, kind: str | None = None) -> None:
        self.faults.clear(host, kind)
        if host in (None, GHCR, CDN):
            self.cdn.expire_next(0)
        if host in (None, API_GITHUB):
            self.github.rate_limit(None)

    def fail_status(self, host: str, status: int, path: str | None = None, *, times: int | None = 1,
                    headers: list[tuple[str, str]] | dict[str, str] | None = None,
                    body: bytes | str = b"", content_type: str = "application/json",
                    method: str | None = None) -> Fault:
        hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        return self.add_fault(host, "status", path, times=times, method=method, status=status,
                              headers=hdrs, body=body, content_type=content_type)

    def too_many_requests(self, host: str, path: str | None = None, *, times: int | None = 1,
                          retry_after: int | None = 30, style: str = "retry-after") -> Fault:
        """429. style="retry-after": OCI TOOMANYREQUESTS + Retry-After header;
        style="ghcr": ghcr's body ``TOOMANYREQUESTS: retry-after: 35.852µs,
        allowed: 44000/minute`` (no useful Retry-After); style="plain": text."""
        headers: list[tuple[str, str]] = []
        if style == "ghcr":
            body = oci_error_body("TOOMANYREQUESTS", GHCR_TOOMANY)
        elif style == "plain":
            body = b"Too Many Requests\n"
            if retry_after is not None:
                headers.append(("Retry-After", str(retry_after)))
            return self.fail_status(host, 429, path, times=times, headers=headers, body=body,
                                    content_type="text/plain; charset=utf-8")
        else:
            body = oci_error_body("TOOMANYREQUESTS", "too many requests")
            if retry_after is not None:
                headers.append(("Retry-After", str(retry_after)))
        return self.fail_status(host, 429, path, times=times, headers=headers, body=body)

    def service_unavailable(self, host: str, path: str | None = None, *, times: int | None = 1) -> Fault:
        return self.fail_status(host, 503, path, times=times,
                                body=oci_error_body("UNAVAILABLE", "service unavailable"))

    def blob_unknown(self, host: str = MIRROR, path: str | None = r"/blobs/", *, times: int | None = 1) -> Fault:
        """404 BLOB_UNKNOWN with an OCI error body (GCR's occasional answer)."""
        return self.fail_status(host, 404, path, times=times,
                                body=oci_error_body("BLOB_UNKNOWN", "blob unknown to registry"))

    def cut_after(self, host: str, nbytes: int, path: str | None = None, *, times: int | None = 1,
                  reset: bool = False) -> Fault:
        """Abort the TCP connection after *nbytes* body bytes (Content-Length
        still announced in full). reset=True sends an RST instead of a FIN."""
        return self.add_fault(host, "cut", path, times=times, after=int(nbytes), reset=reset)

    def corrupt_byte(self, host: str, offset: int, path: str | None = None, *, times: int | None = 1) -> Fault:
        """Flip (xor 0xFF) the body byte at *offset*; size unchanged."""
        return self.add_fault(host, "corrupt", path, times=times, offset=int(offset))

    def throttle(self, host: str, bytes_per_second: float, path: str | None = None, *,
                 times: int | None = None) -> Fault:
        return self.add_fault(host, "throttle", path, times=times, bytes_per_second=float(bytes_per_second))

    def hang(self, host: str, path: str | None = None, *, times: int | None = 1, max_seconds: float = 30.0) -> Fault:
        """Read the request and never answer; the connection is closed after
        *max_seconds* (bounded)."""
        return self.add_fault(host, "hang", path, times=times, max_seconds=float(max_seconds))

    def drop(self, host: str, path: str | None = None, *, times: int | None = 1, reset: bool = False) -> Fault:
        """Close the connection right after reading the request (no response)."""
        return self.add_fault(host, "drop", path, times=times, reset=reset)

    def delay(self, host: str, seconds: float, path: str | None = None, *, times: int | None = 1) -> Fault:
        return self.add_fault(host, "delay", path, times=times, seconds=float(seconds))

    def expire_signed_urls(self, times: int = 1) -> None:
        """The next *times* ghcr.io 307s carry an already-past ``se=``."""
        self.cdn.expire_next(times)

    def github_rate_limit(self, after: int | None) -> None:
        """Allow *after* more api.github.com calls, then 403 "API rate limit
        exceeded" with X-RateLimit-Remaining: 0 (None = lift the limit)."""
        self.github.rate_limit(after)

    def _check_host(self, host: str) -> None:
        if host not in self.hosts:
            raise ValueError(f"unknown emulated host {host!r}")

    # --------------------------------------------------- refuse / accept
    async def refuse(self, host: str, close_existing: bool = True) -> None:
        """Stop *host*'s listener: new connections are refused."""
        self._check_host(host)
        srv = self._servers[host]
        await srv.stop_listening()
        if close_existing:
            await srv.close_connections()

    async def accept(self, host: str) -> None:
        """Restart *host*'s listener on the same port."""
        self._check_host(host)
        await self._servers[host].start()

    async def stall(self, host: str, max_seconds: float = 30.0) -> None:
        """Accept TCP connections for *host* but never complete TLS (each is
        closed after *max_seconds*); ``accept(host)`` restores service."""
        self._check_host(host)
        srv = self._servers[host]
        await srv.close_connections()
        await srv.stall(max_seconds)

    def is_listening(self, host: str) -> bool:
        return self._servers[host].listening


class WorldThread:
    """Runs a :class:`World` on an event loop in a daemon thread.

    Attribute access is delegated to the World (all knobs and log queries are
    thread-safe); coroutine methods (``refuse``/``accept``) are wrapped to run
    on the world's loop and block until done.
    """

    def __init__(self, workdir: str | os.PathLike[str] | None = None, **kw: Any) -> None:
        self.world = World(workdir, **kw)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._extras: list[Any] = []

    def start(self, timeout: float = 120.0) -> "WorldThread":
        if self._thread is not None:
            return self
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="emulated-world", daemon=True)
        self._thread.start()
        ready.wait(10)
        try:
            self.call(self.world.start(), timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def call(self, coro: Awaitable[T], timeout: float | None = 60.0) -> T:
        """Run a coroutine on the world's loop and wait for its result."""
        assert self._loop is not None, "not started"
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            for x in reversed(self._extras):
                try:
                    self.call(x.stop(), timeout=15)
                except Exception:
                    pass
            self._extras.clear()
            try:
                self.call(self.world.stop(), timeout=30)
            except Exception:
                pass
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(15)
            if not thread.is_alive():
                loop.close()
            self._loop = None
            self._thread = None

    def __enter__(self) -> "WorldThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # sync wrappers for the async knobs
    def refuse(self, host: str, close_existing: bool = True) -> None:
        self.call(self.world.refuse(host, close_existing))

    def accept(self, host: str) -> None:
        self.call(self.world.accept(host))

    def stall(self, host: str, max_seconds: float = 30.0) -> None:
        self.call(self.world.stall(host, max_seconds))

    def tunnel_proxy(self, **kw: Any):
        """Start a CONNECT tunnel proxy (on this loop) mapping host:443 to the
        world's ports; stopped together with the world."""
        from .tunnel_proxy import TunnelProxy

        proxy = TunnelProxy(self.world.address_overrides, **kw)
        self.call(proxy.start())
        self._extras.append(proxy)
        return proxy

    def __getattr__(self, name: str) -> Any:
        if name == "world":
            raise AttributeError(name)
        return getattr(self.world, name)
