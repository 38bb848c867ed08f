"""The shared-state interface: what replicas must agree on, and its in-process implementation.

Three things make several gateways act as one (docs/scale-out.md): circuit openings (a Maven 429
with ``Retry-After: 1800`` stops every replica), the upstream budget per host (one egress IP,
one GitHub/ghcr/Maven budget), and fill leases (one upstream fetch per object for the fleet).

:class:`LocalState` is today's single-process behaviour, exactly: every lease is granted (the
pipeline's own single flight is the only one there is), the budget is the upstream client's own
limiter, circuits are the client's own breakers. :class:`~gateway.shared.redis_state.RedisState`
shares them through Redis.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Holder:
    """Who holds a fill lease: a replica id and the address of its peer endpoint ("" = none)."""

    replica: str
    peer: str

    def encode(self) -> str:
        return json.dumps({"replica": self.replica, "peer": self.peer}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str) -> "Holder":
        try:
            d = json.loads(raw)
            return cls(str(d["replica"]), str(d.get("peer") or ""))
        except (ValueError, KeyError, TypeError):
            return cls("?", "")


class SharedState:
    """Interface (and the in-process implementation: :class:`LocalState` is this class)."""

    #: this replica's identity in leases and circuit messages
    replica_id: str = "local"
    #: the token peers present on the peer endpoint ("" when there is none)
    peer_token: str = ""

    def set_peer_address(self, address: str) -> None:
        """Where other replicas reach this one (known after the peer endpoint bound)."""

    async def start(self, upstream) -> None:
        """Attach to the upstream client's seams (circuits, budget) and connect."""

    async def close(self) -> None:
        pass

    # -- fill leases -------------------------------------------------------------------------
    async def acquire_lease(self, key_id: str) -> Optional[Holder]:
        """Take the fleet lease for a fill: None = taken (lead the fill), else who holds it."""
        return None

    async def lease_holder(self, key_id: str) -> Optional[Holder]:
        """Who holds the lease now (None: nobody; it expired or was released)."""
        return None

    async def renew_lease(self, key_id: str) -> bool:
        return True

    async def release_lease(self, key_id: str) -> None:
        pass

    async def break_lease(self, key_id: str, holder: Holder) -> None:
        """Remove ``holder``'s lease (it is known to be gone); a newer holder's stays."""

    async def heartbeat(self, info: dict, ttl: float) -> Optional[list[dict]]:
        """Publish this replica's view; every live replica's (None: no fleet to ask)."""
        return None

    # -- which replicas hold a verified body in their local tier --------------------------------
    async def add_holder(self, digest: str, peer: str) -> None:
        """This replica (reachable at ``peer``) holds ``digest`` in its local tier."""

    async def holders(self, digest: str) -> list[str]:
        return []

    async def drop_holder(self, digest: str, peer: str) -> None:
        """``peer`` no longer serves ``digest`` (evicted, or gone)."""

    @property
    def available(self) -> bool:
        """False while the shared backend is unreachable (this replica then works alone)."""
        return True


class LocalState(SharedState):
    """One process alone: every method above is a no-op, as the gateway always behaved."""
