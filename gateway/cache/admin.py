"""Operator commands on the cache directory: ``cache stats | ls | purge | verify``.

They work on the files directly, so they also run while the gateway is up: after a purge (or a
verify that removed blobs) they touch a marker file that a running gateway checks once a second,
and it then forgets the entries and small bodies it holds in memory; an entry whose body blob has
disappeared is a miss.

They see every local tier of the data dir (``<data_dir>/cache`` and, with ``server.workers``,
each worker's ``<data_dir>/workers/<i>/cache``: :mod:`.tiers`) and a purge applies to all of
them, and to the shared Redis front when there is one: a purge that reached only some of the
places a gateway serves from would let the operator believe a bad entry is gone.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from typing import Optional

from ..observability.metrics import Metrics
from ..settings import MemoryFrontSettings, Settings, parse_duration
from .blobstore import BlobStore
from .entries import Entry, EntryStore, _MemoryFront
from .tiers import Tier, cache_tiers


def open_tier(settings: Settings, tier: Tier) -> tuple[BlobStore, EntryStore]:
    """A tier's stores as a second process opens them beside a running gateway."""
    metrics = Metrics()
    # the whole budget, not the worker's share: this process never evicts (nothing is put)
    blobs = BlobStore(tier.root, settings.cache.max_size, 0, metrics)
    blobs.open(clean_tmp=False)  # a running gateway's fills in tmp/ are alive
    entries = EntryStore(tier.root, blobs, settings.cache.memory, metrics)
    entries.open()
    return blobs, entries


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)  # pragma: no cover


_DIGEST = re.compile(r"(sha256:[0-9a-f]{12})[0-9a-f]{52}")


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def readable_key(key: str) -> str:
    """``tag|ghcr.io/aquasecurity/trivy-db:2|application/…|<scope>`` → ``ghcr.io/aquasecurity/
    trivy-db:2``: the resource a person recognises, digests shortened, credential-scoped entries
    marked (``cache ls --keys`` prints the raw key for scripts)."""
    parts = key.split("|")
    if len(parts) < 2:
        return key
    kind, what = parts[0], re.sub(r"^https?://", "", parts[1])
    if kind in ("blob", "manifest") and parts[1] in ("http", "https") and len(parts) >= 4:
        # by digest: ``blob|<scheme>|<digest>|<scope>`` (the scheme the gateway fetches with)
        what = parts[2] + (" (plain http)" if parts[1] == "http" else "")
    if kind == "oci-ping":
        what = f"{what} (registry ping)"
    elif kind == "oci-token":
        what = f"{what} (token)"
    what = _DIGEST.sub(r"\1…", what)
    if kind in ("blob", "manifest", "tag") and parts[-1] not in ("public", "anonymous", ""):
        what += "  [private: fetched with credentials]"
    return what


def run_cache_command(settings: Settings, args: argparse.Namespace,
                      front: Optional[MemoryFrontSettings] = None) -> int:
    """``front``: the memory front the gateway uses (with Redis, shared by every worker and
    replica: a purge removes the purged keys there too)."""
    tiers = [(t, *open_tier(settings, t)) for t in cache_tiers(settings.data_dir)]
    cmd = args.cache_command
    if cmd == "stats":
        rows = [{"tier": t.name, "root": str(t.root), "blobs": b.count, "entries": e.count,
                 "size_bytes": b.size} for t, b, e in tiers]
        size = sum(r["size_bytes"] for r in rows)
        print(json.dumps({"blobs": sum(r["blobs"] for r in rows),
                          "entries": sum(r["entries"] for r in rows), "size_bytes": size,
                          "size": _human(size), "max_size_bytes": settings.cache.max_size,
                          "root": str(settings.data_dir), "tiers": rows}, indent=2))
        return 0
    if cmd == "ls":
        now = time.time()
        raw = getattr(args, "keys", False)
        print(f"{'KIND':13} {'STATUS':6} {'SIZE':>10} {'CHECKED':>8} {'STATE':5} {'TIER':9} "
              f"{'KEY' if raw else 'RESOURCE'}")
        for tier, _, entries in tiers:
            for e in entries.iter_entries():
                fresh = "fresh" if e.is_fresh(now) else "stale"
                age = _age(now - e.validated_at)
                print(f"{e.kind:13} {e.status:<6} {_human(e.body_size):>10} {age:>8} {fresh:5} "
                      f"{tier.name:9} {e.key if raw else readable_key(e.key)}")
        return 0
    if cmd == "purge":
        return _purge(settings, args, tiers, front)
    if cmd == "verify":
        checked = removed = 0
        for tier, blobs, entries in tiers:
            bad = [d for d in blobs.digests() if not blobs.verify(d)]
            if bad:
                entries.mark_purged()
            checked += blobs.count + len(bad)
            removed += len(bad)
            for d in bad:
                print(d if len(tiers) == 1 else f"{d} {tier.name}")
        print(f"verified {checked} blobs, removed {removed} corrupt", file=sys.stderr)
        return 1 if removed else 0
    return 2


def _purge(settings: Settings, args: argparse.Namespace, tiers: list, front) -> int:
    """Purge every tier, then the shared front; exit 1 when a part could not be reached."""
    cutoff = time.time() - parse_duration(args.older_than, "--older-than") if args.older_than else None
    removed_keys: set[str] = set()
    report = []
    for tier, blobs, entries in tiers:
        removed = 0
        for e in list(entries.iter_entries()):
            if not purge_selects(e, args.host, args.repo):
                continue
            if cutoff is not None and e.validated_at > cutoff:
                continue
            _delete_sync(entries, e.key)
            removed_keys.add(e.key)
            removed += 1
        # blobs no entry refers to any more are garbage
        referenced = {e.body_digest for e in entries.iter_entries() if e.body_digest}
        dropped = [d for d in blobs.digests() if d not in referenced]
        for d in dropped:
            blobs.remove(d)
        if removed or dropped:
            entries.mark_purged()                # the gateway serving it drops what memory holds
        report.append((tier.name, removed, len(dropped)))
    total = (sum(r[1] for r in report), sum(r[2] for r in report))
    tail = "" if len(report) < 2 else " (" + ", ".join(
        f"{name}: {n} entries, {b} blobs" for name, n, b in report) + ")"
    print(f"removed {total[0]} entries and {total[1]} unreferenced blobs{tail}", file=sys.stderr)
    return _purge_shared(settings, front, removed_keys)


def _purge_shared(settings: Settings, front: Optional[MemoryFrontSettings],
                  keys: set[str]) -> int:
    """Delete the purged keys from a Redis memory front: it outlives the gateways (a gateway
    stopped during the purge would otherwise serve them from Redis when it starts again), and
    a running one only forgets its own memory when it sees the marker (never FLUSHDB: the
    fleet's circuits, leases and budget live in the same database). ``--all`` deletes the keys
    of the local tiers too: keys only other machines' replicas hold are theirs to purge."""
    if front is not None and front.backend == "redis" and keys:
        error = asyncio.run(_forget_in_redis(front, keys))
        if error:
            print(f"trivy-gateway: cache purge: the shared Redis front ({front.redis_url.split('@')[-1]}) "
                  f"was not purged: {error}. The data dir's tiers were; a gateway would serve "
                  "the purged small entries from Redis: run the purge again when Redis answers",
                  file=sys.stderr)
            return 1
        print(f"removed {len(keys)} keys from the shared Redis front", file=sys.stderr)
    if settings.cache.shared.enabled:
        print("note: replicas on other machines keep their own local tiers: run the same purge "
              "against each replica's data dir", file=sys.stderr)
    if settings.cache.shared.s3.endpoint:
        print("note: bodies in S3 are content-addressed and verified on every read, and are "
              "kept: a purged blob may be filled again from S3 instead of the upstream",
              file=sys.stderr)
    return 0


async def _forget_in_redis(front: MemoryFrontSettings, keys: set[str]) -> Optional[str]:
    cache = _MemoryFront(front).cache
    try:
        for key in sorted(keys):
            await cache.delete(key)
        return None
    except Exception as exc:  # noqa: BLE001 - any Redis failure is reported, not raised
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        await cache.close()


def _oci_coordinates(entry: Entry) -> tuple[Optional[str], Optional[str]]:
    """(registry, repository) of an OCI entry from its ``registry/repository:tag|@digest``
    reference (a registry may carry a port; a repository never holds ``:`` or ``@``)."""
    reference = entry.meta.get("reference") if entry.meta else None
    if not reference or "/" not in reference:
        return None, None
    registry, _, rest = reference.partition("/")
    return registry, re.split(r"[:@]", rest, maxsplit=1)[0]


def _key_host(key: str) -> Optional[str]:
    """The host of the URL in a ``kind|scheme://host/…`` key, if it has one."""
    _, _, rest = key.partition("|")
    _, sep, after = rest.partition("://")
    return re.split(r"[/|?]", after, maxsplit=1)[0] if sep else None


def purge_selects(entry: Entry, host: Optional[str], repo: Optional[str]) -> bool:
    """Does ``cache purge --host H --repo R`` select this entry? Exact matches only.

    ``--host``: the host the entry was requested from or served by. ``--repo``: an OCI
    repository, exactly (``aquasec/trivy-db`` on any registry, or ``mirror.gcr.io/aquasec/trivy-db``
    on that one): ``trivy-db`` alone selects nothing, and never ``aquasec/trivy-db-extra``."""
    registry, repository = _oci_coordinates(entry)
    if host:
        hosts = {entry.meta.get("host") if entry.meta else None, registry, _key_host(entry.key)}
        if host.lower() not in hosts:
            return False
    if repo:
        if repository is None:
            return False
        return repo in (repository, f"{registry}/{repository}")
    return True


def _delete_sync(entries: EntryStore, key: str) -> None:
    entries._path(key).unlink(missing_ok=True)  # noqa: SLF001 - same package
