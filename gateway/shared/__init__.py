"""State shared by replicas so that they act as one cache (docs/scale-out.md).

:func:`build` returns None for the default (``cache.shared.redis_url`` empty): the gateway then
runs exactly as one process always did (:class:`LocalState` semantics; nothing here is even
imported by the app). With Redis configured it returns a :class:`Shared` bundle: the Redis
state (circuits, budget, leases), the optional S3 tier, the fleet fetcher and the peer endpoint.
Needs the ``scale`` extra (redis, aiobotocore).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..observability.logging import get_logger
from ..observability.metrics import Metrics
from ..settings import Settings
from .state import Holder, LocalState, SharedState

log = get_logger("gateway.shared")

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
        self.fleet = Fleet(self.state, self.s3, blobs, entries, metrics, float(cfg.lease_ttl))
        self.peer = None
        if cfg.peer_listen:
            from .peer import PeerServer  # noqa: PLC0415

            self.peer = PeerServer(cfg.peer_listen, self.fleet.job_for,
                                   lambda: self.state.peer_token)

    async def start(self, upstream) -> None:
        await self.state.start(upstream)
        if self.s3 is not None:
            await self.s3.start()
        await self.fleet.start()
        if self.peer is not None:
            await self.peer.start()
        log.info("shared_state_started", replica=self.state.replica_id,
                 redis=self.state.available, s3=self.s3.cfg.endpoint if self.s3 else None,
                 peer=self.advertise or None)

    async def close(self) -> None:
        if self.peer is not None:
            await self.peer.close()
        await self.fleet.close()
        if self.s3 is not None:
            await self.s3.close()
        await self.state.close()

    def status(self) -> dict:
        """This replica's part of the fleet, for the status page."""
        return {
            "replica": self.state.replica_id,
            "peer": self.advertise or None,
            "redis_up": self.state.available,
            "s3_up": self.s3.avail.up if self.s3 else None,
            "fills_in_flight_here": len(self.fleet.jobs),
        }


def build(settings: Settings, metrics: Metrics, blobs, entries) -> Optional[Shared]:
    if not settings.cache.shared.enabled:
        return None
    return Shared(settings, metrics, blobs, entries)
