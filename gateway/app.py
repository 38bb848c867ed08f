"""Wires the layers together and owns start-up and shutdown.

Start-up order follows the data path bottom-up (stores → upstream → pipeline → proxy → admin),
so the proxy never accepts a client before everything under it is ready; shutdown runs the
other way: stop accepting, drain in-flight transfers within ``server.drain_grace``, then close.
"""
from __future__ import annotations

import asyncio
import shutil
import signal
import time
from typing import Optional

from . import __version__
from .admin.server import AdminServer
from .cache import BlobStore, EntryStore
from .hostport import join_authority
from .observability.logging import get_logger
from .mirror import MirrorServer
from .observability.metrics import Metrics
from .pipeline import Pipeline
from .policy import Policy
from .proxy import ProxyServer
from .settings import Settings
from .shared import Shared, build as build_shared, shared_memory_front
from .tls.ca import CertificateAuthority
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


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.metrics.build_info.info({"version": __version__})
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.load_or_create(s)
        leaf = LeafIssuer(self.ca, s.tls, self.metrics)
        policy = Policy(s.policy)
        cache_root = s.data_dir / "cache"
        self.blobs = BlobStore(cache_root, s.cache.max_size, s.cache.min_free_space, self.metrics,
                               s.cache.max_object_size)
        self.blobs.open()
        self.entries = EntryStore(cache_root, self.blobs, shared_memory_front(s), self.metrics)
        self.entries.open()
        self.upstream = UpstreamClient(s.upstream, self.metrics, address_guard=policy.address_allowed)
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
                                 ahost, aport)
        await self.admin.start()
        log.info("gateway_started", version=__version__, listen=f"{host}:{port}",
                 admin=f"{ahost}:{self.admin.port}",
                 mirror="{}:{}".format(*self.mirror.address) if self.mirror else None,
                 data_dir=str(s.data_dir),
                 config=s.source, ca_sha256=self.ca.fingerprint_sha256)

    def ready(self) -> bool:
        return not self.draining and self.proxy is not None

    async def stop(self) -> None:
        """Graceful: refuse new work, let in-flight transfers finish, then close everything."""
        if self.draining:
            return
        self.draining = True
        log.info("gateway_draining", grace=self.settings.server.drain_grace)
        doors = [d for d in (self.proxy, self.mirror) if d is not None]
        for door in doors:
            door.stop_accepting()
        await asyncio.gather(*(d.drain(self.settings.server.drain_grace) for d in doors))
        for door in doors:
            await door.close()
        if self.pipeline:
            await self.pipeline.close()
        if self.shared:
            await self.shared.close()
        if self.upstream:
            await self.upstream.close()
        if self.admin:
            await self.admin.close()
        log.info("gateway_stopped")
        self._stopped.set()

    async def run_forever(self) -> None:
        """Start, then run until SIGTERM/SIGINT; exit code 0 after a clean drain."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop()

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
        for sample in self.metrics.served_bytes.collect()[0].samples:
            if sample.name.endswith("_total"):
                bytes_served[sample.labels["source"]] = int(sample.value)
        now = time.time()
        artifacts = []
        for a in (self.pipeline.artifacts.values() if self.pipeline else []):
            a = dict(a)
            a["age_seconds"] = max(0.0, now - a["fetched_at"])
            artifacts.append(a)
        ca = self.ca
        return {
            "version": __version__,
            "uptime_seconds": now - self.started_at,
            "ready": self.ready(),
            "draining": self.draining,
            "hit_ratio": (served / total) if total else None,
            "cache_results": results,
            "bytes_served": bytes_served,
            "artifacts": sorted(artifacts, key=lambda a: a["artifact"]),
            "upstreams": {host: _upstream_view(h) for host, h in
                          (self.upstream.health() if self.upstream else {}).items()},
            "doors": {name: _door_view(door) for name, door in
                      (("proxy", self.proxy), ("mirror", self.mirror))},
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


def _upstream_view(health: dict) -> dict:
    """The upstream layer's health record in the shape the status page documents."""
    view = dict(health)
    view["circuit"] = health.get("state", "closed")
    view["open_remaining"] = health.get("remaining_seconds") or 0.0
    return view
