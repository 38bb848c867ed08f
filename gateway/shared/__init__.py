"""State shared by replicas so that they act as one cache (docs/scale-out.md).

:func:`build` returns None for the default (``cache.shared.redis_url`` empty): the gateway then
runs exactly as one process always did (:class:`LocalState` semantics; nothing here is even
imported by the app). With Redis configured it returns a :class:`Shared` bundle: the Redis
state (circuits, budget, leases), the optional S3 tier, the fleet fetcher and the peer endpoint.
Needs the ``scale`` extra (redis, aiobotocore).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Optional

from ..observability.logging import get_logger
from ..observability.metrics import Metrics
from ..settings import Settings
from .state import Holder, LocalState, SharedState

log = get_logger("gateway.shared")

#: seconds between a replica's heartbeats in Redis (it disappears from the fleet after 3 missed)
HEARTBEAT = 5.0

__all__ = ["Shared", "build", "shared_memory_front", "SharedState", "LocalState", "Holder"]


def shared_memory_front(settings: Settings):
    """The memory-front settings to use: with shared state, entries live in the same Redis."""
    cfg = settings.cache
    if not cfg.shared.enabled:
        return cfg.memory
    return dataclasses.replace(cfg.memory, backend="redis",
                               redis_url=cfg.shared.redis_url_with_password)


def peer_address(listen: str, advertise: str) -> str:
    """Where other replicas reach this one: ``advertise``, else ``listen`` — with a wildcard
    host replaced by this host's address (its hostname resolves to the pod IP in Kubernetes)."""
    if advertise or not listen:
        return advertise or listen
    host, _, port = listen.rpartition(":")
    if host.strip("[]") not in ("", "0.0.0.0", "::"):
        return listen
    import socket  # noqa: PLC0415

    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = "127.0.0.1"
    return f"{addr}:{port}"


class Shared:
    def __init__(self, settings: Settings, metrics: Metrics, blobs, entries) -> None:
        from .fleet import Fleet  # noqa: PLC0415 - only with the scale extra installed
        from .redis_state import RedisState  # noqa: PLC0415
        from .s3 import S3Tier  # noqa: PLC0415

        cfg = settings.cache.shared
        self.cfg = cfg
        advertise = self.advertise = peer_address(cfg.peer_listen, cfg.peer_advertise)
        self.state: SharedState = RedisState(cfg, settings.upstream, metrics, advertise)
        self.s3 = S3Tier(cfg.s3, metrics) if cfg.s3.endpoint else None
        self.fleet = Fleet(self.state, self.s3, blobs, entries, metrics, float(cfg.lease_ttl),
                           peer_address=advertise)
        self.peer = None
        self.started_at = time.time()
        #: every live replica's last heartbeat (refreshed every HEARTBEAT seconds)
        self.replicas: list[dict] = []
        self._heart: Optional[asyncio.Task] = None
        if cfg.peer_listen:
            from .peer import PeerServer  # noqa: PLC0415

            self.peer = PeerServer(cfg.peer_listen, self.fleet.job_for,
                                   lambda: self.state.peer_token, blobs)

    async def start(self, upstream) -> None:
        if self.peer is not None:
            await self.peer.start()  # first: a port in use fails before anything is opened
            if self.advertise.endswith(":0"):  # an ephemeral port: known only now
                self.advertise = f"{self.advertise.rpartition(':')[0]}:{self.peer.port}"
                self.fleet.peer_address = self.advertise
                self.state.set_peer_address(self.advertise)
        await self.state.start(upstream)
        if self.s3 is not None:
            await self.s3.start()
        await self.fleet.start()
        self.started_at = time.time()
        await self._beat()
        self._heart = asyncio.get_running_loop().create_task(self._heartbeat(),
                                                            name="fleet heartbeat")
        log.info("shared_state_started", replica=self.state.replica_id,
                 redis=self.state.available, s3=self.s3.cfg.endpoint if self.s3 else None,
                 peer=self.advertise or None)

    async def _beat(self) -> None:
        fleet = await self.state.heartbeat(self.here(), 3 * HEARTBEAT)
        if fleet is not None:
            self.replicas = fleet

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            await self._beat()

    async def close(self) -> None:
        if self._heart is not None:
            self._heart.cancel()
            await asyncio.gather(self._heart, return_exceptions=True)
        if self.peer is not None:
            await self.peer.close()
        await self.fleet.close()
        if self.s3 is not None:
            await self.s3.close()
        await self.state.close()

    def here(self) -> dict:
        """This replica's part of the fleet: fills by source, bytes moved to/from S3."""
        return {
            "replica": self.state.replica_id,
            "peer": self.advertise or None,
            "started_at": self.started_at,
            "fills": dict(self.fleet.counts),
            "fills_in_flight": len(self.fleet.jobs),
            "s3_bytes": dict(self.s3.bytes) if self.s3 else None,
        }

    def status(self) -> dict:
        """For the status page: this replica, the backends as it sees them, and every live
        replica's last heartbeat (from Redis; this replica alone while Redis is away)."""
        here = self.here()
        return {**here, "redis_up": self.state.available,
                "s3_up": self.s3.avail.up if self.s3 else None,
                "replicas": [here if r.get("replica") == here["replica"] else r
                             for r in self.replicas] or [here]}


def build(settings: Settings, metrics: Metrics, blobs, entries) -> Optional[Shared]:
    if not settings.cache.shared.enabled:
        return None
    return Shared(settings, metrics, blobs, entries)
