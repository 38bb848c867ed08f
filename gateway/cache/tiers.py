"""The local cache tiers of one data dir, as the operator commands see them.

A single gateway keeps its cache in ``<data_dir>/cache``; with ``server.workers: N`` each worker
is a replica with its own tier ``<data_dir>/workers/<i>/cache`` (gateway/workers.py). The
operator commands (``cache …``, ``bundle export``) work on every tier present on disk, not on
the tiers the current configuration would create: a purge must also reach a tier that a
previous ``server.workers`` value left behind, or a worker started later would serve it again.

Why no lock: like ``cache …`` on a single gateway, the commands run beside the serving
processes, which hold the data-dir locks. Each tier is changed only the way a running gateway
tolerates (entry files removed, unreferenced blobs removed, ``tmp/`` left alone) and then its
own purge marker is touched, which the worker serving that tier checks once a second.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

#: ``<data_dir>/workers/<i>``: the per-worker data dirs (gateway.workers.worker_settings)
WORKERS_DIR = "workers"
CACHE_DIR = "cache"


@dataclass(frozen=True)
class Tier:
    """One local tier: ``name`` is what ``cache ls`` prints (``main``, ``worker-0``, …)."""
    name: str
    root: Path


def cache_tiers(data_dir: Path) -> list[Tier]:
    """Every tier with a cache directory, the single-process one first, workers by number."""
    tiers = []
    if (data_dir / CACHE_DIR).is_dir():
        tiers.append(Tier("main", data_dir / CACHE_DIR))
    for i, root in sorted(_worker_caches(data_dir)):
        tiers.append(Tier(f"worker-{i}", root))
    return tiers


def _worker_caches(data_dir: Path) -> Iterator[tuple[int, Path]]:
    try:
        children = list((data_dir / WORKERS_DIR).iterdir())
    except OSError:
        return
    for child in children:
        index = _index(child.name)
        if index is not None and (child / CACHE_DIR).is_dir():
            yield index, child / CACHE_DIR


def _index(name: str) -> Optional[int]:
    return int(name) if name.isdigit() else None


class TierUnion:
    """Several tiers' blob and entry stores read as one (``bundle export``): the read side of
    :class:`~.blobstore.BlobStore` and :class:`~.entries.EntryStore` that the export uses.

    A key held by several workers is taken once, the copy validated last whose body some tier
    holds; a blob is read from the first tier that has it (the same digest is the same bytes)."""

    def __init__(self, stores: list) -> None:
        #: (BlobStore, EntryStore) per tier
        self.stores = stores

    def iter_entries(self):
        best: dict = {}
        for _, entries in self.stores:
            for e in entries.iter_entries():
                if e.body_digest and self._owner(e.body_digest) is None:
                    continue
                if e.key not in best or e.validated_at > best[e.key].validated_at:
                    best[e.key] = e
        return iter(sorted(best.values(), key=lambda e: e.key))

    def _owner(self, digest: str):
        return next((b for b, _ in self.stores if b.has(digest)), None)

    def has(self, digest: str) -> bool:
        return self._owner(digest) is not None

    def size_of(self, digest: str) -> Optional[int]:
        owner = self._owner(digest)
        return owner.size_of(digest) if owner else None

    def read_small(self, digest: str, limit: int) -> Optional[bytes]:
        owner = self._owner(digest)
        return owner.read_small(digest, limit) if owner else None

    def path_of(self, digest: str) -> Path:
        owner = self._owner(digest) or self.stores[0][0]
        return owner.path_of(digest)
