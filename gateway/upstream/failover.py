"""Failover groups: OCI repositories that publish identical artifacts (same digests).

Pure lookups over ``upstream.failover_groups`` (entries ``"registry/repository"``): the cache layer
asks for the other members of a failed repository's group and tries them in the configured order;
when one of them answers it calls :meth:`Failover.record_failover` for the metric.
"""
from __future__ import annotations

from itertools import permutations
from typing import Iterable, Optional, Sequence

from ..hostport import canonical_authority
from ..observability.metrics import Metrics


def _split(entry: str) -> tuple[str, str]:
    """``registry.corp:5000/team/db`` → (``registry.corp:5000``, ``team/db``): the port stays
    with the registry (it is a different registry than the same host on 443)."""
    registry, _, repository = entry.strip().strip("/").partition("/")
    return canonical_authority(registry), repository


def equivalents(groups: Iterable[Sequence[str]], registry: str, repository: str
                ) -> list[tuple[str, str]]:
    """The other members of the group holding ``registry/repository`` (registry =
    ``host[:port]``), in configured order."""
    key = (canonical_authority(registry), repository.strip("/"))
    for group in groups:
        members = [_split(e) for e in group]
        if key in members:
            return [m for m in members if m != key]
    return []


class Failover:
    def __init__(self, groups: Iterable[Sequence[str]], metrics: Optional[Metrics] = None) -> None:
        self.groups = tuple(tuple(g) for g in groups)
        self.metrics = metrics
        if metrics is not None:
            metrics.add_known_hosts({_split(e)[0] for g in self.groups for e in g})
            for group in self.groups:
                for a, b in permutations(dict.fromkeys(_split(e)[0] for e in group), 2):
                    metrics.add_failover_pair(a, b)

    def equivalents(self, registry: str, repository: str) -> list[tuple[str, str]]:
        return equivalents(self.groups, registry, repository)

    def record_failover(self, from_host: str, to_host: str) -> None:
        if self.metrics is not None:
            self.metrics.failovers.labels(from_host=self.metrics.host_label(from_host),
                                          to_host=self.metrics.host_label(to_host)).inc()
