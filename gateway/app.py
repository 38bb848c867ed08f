"""Wires the layers together and owns start-up and shutdown.

Start-up order follows the data path bottom-up (stores → upstream → pipeline → proxy → admin),
so the proxy never accepts a client before everything under it is ready; shutdown runs the
other way: stop accepting, drain in-flight transfers within ``server.drain_grace``, then close.
"""
from __future__ import annotations

import asyncio
import ipaddress
import shutil
import signal
import time
from typing import Callable, Optional

from . import __version__
from .admin.server import AdminServer
from .cache import BlobStore, EntryStore
from .cache.keyformat import migrate_keys
from .hostport import join_authority
from .mirror import MirrorServer
from .lifecycle.freshness import Freshness
from .lifecycle.prefetch import Prefetcher
from .observability.logging import get_logger
from .observability.metrics import Metrics
from .pipeline import Pipeline
from .health import DenialLog, RecordingPolicy, assess, recent_errors
from .policy import ACTION_DENY
from .resources.legacy import KEY_UPGRADE
from .proxy import ProxyServer
from .proxy.auth import ProxyAuth
from .reload import ReloadResult, split_changes
from .settings import ConfigError, Settings, settings_digest, split_hostport
from .shared import Shared, build as build_shared, shared_memory_front
from .startup import DataDirLock, ca_error, check_addresses, check_files, data_dir_error
from .tls.ca import CAError, CertificateAuthority
from .tls.leaf import LeafIssuer
from .upstream import UpstreamClient

log = get_logger("gateway.app")


def known_hosts(settings: Settings) -> set[str]:
    """Hosts named anywhere in the configuration: the bounded set of metric label values."""
    hosts = {r.host for r in settings.policy.rules if "*" not in r.host}
    # upstreams are labelled host[:port] (gateway.hostport): an exact rule's other ports too
    hosts |= {join_authority(r.host, p) for r in settings.policy.rules if "*" not in r.host
              for p in r.ports}
    hosts |= set(settings.upstream.address_overrides)
    hosts |= set(settings.cache.oci.registries) | set(settings.cache.github.hosts)
    hosts |= {repo.split("/", 1)[0] for repo in settings.cache.maven.repositories}
    hosts |= {member.split("/", 1)[0] for group in settings.upstream.failover_groups
              for member in group}
    return hosts


def configured_upstreams(settings: Settings) -> set[str]:
    """Hosts the configuration expects to reach: exact allow rules and address overrides."""
    hosts = {r.host for r in settings.policy.rules
             if "*" not in r.host and r.action != ACTION_DENY}
    return hosts | set(settings.upstream.address_overrides)


class Gateway:
    def __init__(self, settings: Settings,
                 loader: Optional[Callable[[], Settings]] = None) -> None:
        self.settings = settings
        #: re-reads the configuration from the start-up sources (file, env, flags) for reload
        self._loader = loader
        self.config_digest = settings_digest(settings)
        self.last_reload: Optional[dict] = None
        self.metrics = Metrics(known_hosts(settings))
        self.started_at = time.time()
        self.draining = False
        self._stopped = asyncio.Event()
        self.ca: Optional[CertificateAuthority] = None
        self.proxy: Optional[ProxyServer] = None
        self.mirror: Optional[MirrorServer] = None
        self.admin: Optional[AdminServer] = None
        self.upstream: Optional[UpstreamClient] = None
        self.pipeline: Optional[Pipeline] = None
        self.shared: Optional[Shared] = None
        self._lock = DataDirLock(settings)
        self.denials = DenialLog()
        self.prefetcher: Optional[Prefetcher] = None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Check the ports, take the data dir, then build bottom-up; on any failure close what
        was opened (no "Unclosed client session", no lock left) and raise StartupError/OSError."""
        check_addresses(self.settings)   # before any state exists: a taken port creates nothing
        check_files(self.settings)       # nor does a missing certificate (ConfigErrors, exit 2)
        self._lock.acquire()
        try:
            await self._start()
        except BaseException:
            await self._close_all()
            self._lock.release()
            raise

    async def _start(self) -> None:
        s = self.settings
        self.metrics.build_info.info({"version": __version__})
        self.metrics.config_info.info({"digest": self.config_digest, "source": s.source})
        try:
            self.ca = CertificateAuthority.load_or_create(s)
        except OSError as exc:
            raise data_dir_error(s, exc) from None
        except CAError as exc:
            raise ca_error(s, exc) from None
        leaf = LeafIssuer(self.ca, s.tls, self.metrics)
        policy = self.policy = RecordingPolicy(s.policy, self.denials)
        cache_root = s.data_dir / "cache"
        try:
            self.blobs = BlobStore(cache_root, s.cache.max_size, s.cache.min_free_space,
                                   self.metrics, s.cache.max_object_size)
            self.blobs.open()
            self.entries = EntryStore(cache_root, self.blobs, shared_memory_front(s), self.metrics)
            # entries stored by an older gateway under older keys: renamed or dropped, once
            migrate_keys(self.entries, KEY_UPGRADE)
            self.entries.open()
        except OSError as exc:
            raise data_dir_error(s, exc) from None
        # the guard asks the current policy, so a reload reaches the upstream layer too
        self.upstream = UpstreamClient(s.upstream, self.metrics,
                                       address_guard=lambda h, ip: self.policy.address_allowed(h, ip))
        await self.upstream.start()
        self.shared = build_shared(s, self.metrics, self.blobs, self.entries)
        if self.shared is not None:
            await self.shared.start(self.upstream)
        self.pipeline = Pipeline(s, self.blobs, self.entries, self.upstream, self.metrics,
                                 fleet=self.shared.fleet if self.shared else None)
        self.proxy = ProxyServer(s, policy, leaf, self.pipeline, self.metrics,
                                 open_tunnel=self.upstream.open_tunnel)
        await self.proxy.start()
        if s.server.mirror_listen:
            self.mirror = MirrorServer(s, policy, self.pipeline, self.metrics)
            await self.mirror.start()
        host, port = self.proxy.address
        ahost, aport = s.server.admin_addr
        self.admin = AdminServer(self.metrics, self.status, self.ready, lambda: self.ca.cert_pem,
                                 ahost, aport, token=s.server.admin_token)
        await self.admin.start()
        _warn_if_exposed(s)
        if s.lifecycle.prefetch.enabled:
            self.prefetcher = Prefetcher(
                s.lifecycle.prefetch, s.cache, self.pipeline.handle, policy, self.entries,
                self.blobs, self.metrics,
                Freshness(s.data_dir / "lifecycle" / "prefetch.json", self.metrics))
            self.prefetcher.start()
        log.info("gateway_started", version=__version__, listen=f"{host}:{port}",
                 admin=f"{ahost}:{self.admin.port}",
                 mirror="{}:{}".format(*self.mirror.address) if self.mirror else None,
                 data_dir=str(s.data_dir),
                 config=s.source, config_digest=self.config_digest,
                 ca_sha256=self.ca.fingerprint_sha256)

    def ready(self) -> bool:
        return not self.draining and self.proxy is not None

    async def stop(self) -> None:
        """Graceful: refuse new work, let in-flight transfers finish, then close everything."""
        if self.draining:
            return
        self.draining = True
        log.info("gateway_draining", grace=self.settings.server.drain_grace)
        if self.prefetcher:
            await self.prefetcher.stop()
        doors = self._doors()
        for door in doors:
            door.stop_accepting()
        await asyncio.gather(*(d.drain(self.settings.server.drain_grace) for d in doors))
        await self._close_all()
        self._lock.release()
        log.info("gateway_stopped")
        self._stopped.set()

    def _doors(self) -> list[ProxyServer]:
        """The front doors that are open (the proxy; the mirror when configured)."""
        return [d for d in (self.proxy, self.mirror) if d is not None]

    async def _close_all(self) -> None:
        for door in self._doors():
            await door.close()
        if self.pipeline:
            await self.pipeline.close()
        if self.shared:
            await self.shared.close()
        if self.upstream:
            await self.upstream.close()
        if self.admin:
            await self.admin.close()

    async def run_forever(self) -> None:
        """Start, then run until SIGTERM/SIGINT; exit code 0 after a clean drain."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await stop.wait()
        loop.remove_signal_handler(signal.SIGHUP)
        await self.stop()

    # -- live reload ----------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the configuration and apply what can change live (gateway.reload).

        Synchronous on purpose: the swap happens between two steps of the event loop, so every
        request sees either the old or the new configuration, never a mix. Returns False (and
        keeps everything) when the new configuration is invalid.
        """
        if self._loader is None or self.draining:
            return False
        now = time.time()
        try:
            new = self._loader()
            check_files(new)    # a typo in a certificate's path would only bite at the restart
        except ConfigError as exc:
            errors = [e.describe() for e in exc.errors]
            self.metrics.config_reloads.labels(result=ReloadResult.REFUSED).inc()
            self.last_reload = {"at": now, "result": str(ReloadResult.REFUSED), "errors": errors}
            log.error("config_reload_refused", errors=errors, active_digest=self.config_digest,
                      hint="fix the file and send SIGHUP again; the running configuration stays")
            return False
        effective, applied, restart = split_changes(self.settings, new)
        self._apply(effective)
        self.config_digest = settings_digest(effective)
        self.metrics.config_info.info({"digest": self.config_digest, "source": effective.source})
        self.metrics.config_reloads.labels(result=ReloadResult.APPLIED).inc()
        self.last_reload = {"at": now, "result": str(ReloadResult.APPLIED), "applied": applied,
                            "restart_needed": restart, "loaded_digest": settings_digest(new)}
        log.info("config_reloaded", digest=self.config_digest, source=effective.source,
                 applied=applied, restart_needed=restart)
        if restart:
            log.warning("config_restart_needed", keys=restart,
                        hint="these changes keep their running values until a restart")
        return True

    def _apply(self, s: Settings) -> None:
        self.settings = s
        self.policy = RecordingPolicy(s.policy, self.denials)
        self.metrics.add_known_hosts(self.policy.hosts)
        for door in self._doors():
            door.settings = s                          # read by each new connection
            door.policy = self.policy
        if self.proxy:
            self.proxy.auth = ProxyAuth(s.proxy.auth)
        if self.pipeline:
            self.pipeline.settings = s
            self.pipeline.cfg = s.cache                # TTLs, staleness, classification
        if self.upstream:
            self.upstream.reconfigure(s.upstream)

    # -- status for the admin page ----------------------------------------------------------
    def status(self) -> dict:
        results = dict(self.pipeline.results) if self.pipeline else {}
        served = sum(results.get(k, 0) for k in ("hit", "stale", "negative", "revalidated",
                                                  "coalesced"))
        total = served + results.get("miss", 0)
        try:
            disk_free = shutil.disk_usage(self.blobs.root).free
        except OSError:
            disk_free = None
        bytes_served = {}
        self.metrics.deferred.flush()
        for sample in self.metrics.served_bytes.collect()[0].samples:
            if sample.name.endswith("_total"):
                bytes_served[sample.labels["source"]] = int(sample.value)
        now = time.time()
        artifacts = []
        for a in (self.pipeline.artifacts.values() if self.pipeline else []):
            a = dict(a)
            a["age_seconds"] = max(0.0, now - a["fetched_at"])
            a["next_check_seconds"] = _next_check(self.settings, a, now)
            artifacts.append(a)
        ca = self.ca
        upstreams = {host: _upstream_view(h) for host, h in
                     (self.upstream.health() if self.upstream else {}).items()}
        return {
            "version": __version__,
            "uptime_seconds": now - self.started_at,
            "ready": self.ready(),
            "draining": self.draining,
            "hit_ratio": (served / total) if total else None,
            "cache_results": results,
            # the prefetcher's own requests: not in the hit ratio (no client asked for them)
            "prefetch_cache_results": dict(self.pipeline.prefetch_results) if self.pipeline else {},
            "bytes_served": bytes_served,
            "artifacts": sorted(artifacts, key=lambda a: a["artifact"]),
            "health": assess(upstreams, artifacts, self.draining),
            "config": {"source": self.settings.source, "digest": self.config_digest,
                       "last_reload": self.last_reload},
            "upstreams": upstreams,
            "doors": {name: _door_view(door) for name, door in
                      (("proxy", self.proxy), ("mirror", self.mirror))},
            "upstreams_not_contacted": sorted(configured_upstreams(self.settings) - set(upstreams)),
            "recent_errors": recent_errors(upstreams),
            "denied": self.denials.snapshot(),
            "lifecycle": self.prefetcher.status() if self.prefetcher else
            {"prefetch_enabled": False, "artifacts": []},
            "cache": {"size_bytes": self.blobs.size, "max_size_bytes": self.blobs.max_size,
                      "blobs": self.blobs.count, "entries": self.entries.count,
                      "disk_free_bytes": disk_free},
            "fleet": self.shared.status() if self.shared else None,
            "ca": {"subject": ca.cert.subject.rfc4514_string(),
                   "fingerprint_sha256": ca.fingerprint_sha256,
                   "not_after": ca.cert.not_valid_after_utc.isoformat()} if ca else None,
        }



def _door_view(door: Optional[ProxyServer]) -> Optional[dict]:
    """Where a front door listens and how busy it is (None: that door is off)."""
    if door is None or not door.listening:
        return None
    host, port = door.address
    return {"listen": f"{host}:{port}", "tls": door.ssl_context is not None,
            "connections": door.active_connections}


def _next_check(settings: Settings, artifact: dict, now: float) -> Optional[float]:
    """Seconds until the tag of ``artifact`` is due for a refresh: from then on, the next
    request for it refreshes it in the background (cache.oci.refresh_ahead of its TTL)."""
    ref = str(artifact.get("reference") or "")
    registry, _, rest = ref.partition("/")
    repository, sep, _tag = rest.rpartition(":")
    if not sep or "@" in ref:
        return None
    oci = settings.cache.oci
    due = artifact["fetched_at"] + oci.ttl_for(registry, repository) * oci.refresh_ahead
    return due - now


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _warn_if_exposed(s: Settings) -> None:
    """The defaults bind every interface (right for a gateway on a private network, where the
    scanners are other hosts); say so once at start when nothing else restricts access."""
    for notice in s.overridden:
        log.warning("config_overridden_by_env", detail=notice)
    host, _ = s.server.listen_addr
    if not s.proxy.auth.enabled and not _is_loopback(host):
        log.warning("proxy_without_auth", listen=s.server.listen,
                    hint="anyone who reaches this address may use the gateway for the allowed "
                         "hosts; firewall it, bind a private address, or enable proxy.auth")
    if s.server.mirror_listen:
        mhost, _ = split_hostport(s.server.mirror_listen, "server.mirror_listen")
        if not _is_loopback(mhost):
            log.warning("mirror_without_auth", mirror_listen=s.server.mirror_listen,
                        hint="the mirror door serves the allowed repositories to anyone who "
                             "reaches it; firewall it or bind a private address")
    ahost, _ = s.server.admin_addr
    if not s.server.admin_token and not _is_loopback(ahost):
        log.warning("admin_without_token", admin_listen=s.server.admin_listen,
                    hint="/metrics, /api/status and the status page are open; set "
                         "TRIVY_GATEWAY_ADMIN_TOKEN or server.admin_token_file to protect them")


def _upstream_view(health: dict) -> dict:
    """The upstream layer's health record in the shape the status page documents."""
    view = dict(health)
    view["circuit"] = health.get("state", "closed")
    view["open_remaining"] = health.get("remaining_seconds") or 0.0
    return view
