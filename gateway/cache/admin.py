"""Operator commands on the cache directory: ``cache stats | ls | purge | verify``.

They work on the files directly, so they also run while the gateway is up: after a purge (or a
verify that removed blobs) they touch a marker file that a running gateway checks once a second,
and it then forgets the entries and small bodies it holds in memory; an entry whose body blob has
disappeared is a miss.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..observability.metrics import Metrics
from ..settings import Settings, parse_duration
from .blobstore import BlobStore
from .entries import EntryStore


def _open(settings: Settings) -> tuple[BlobStore, EntryStore]:
    root = settings.data_dir / "cache"
    metrics = Metrics()
    blobs = BlobStore(root, settings.cache.max_size, 0, metrics)
    blobs.open(clean_tmp=False)  # a running gateway's fills in tmp/ are alive
    entries = EntryStore(root, blobs, settings.cache.memory, metrics)
    entries.open()
    return blobs, entries


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)  # pragma: no cover


def run_cache_command(settings: Settings, args: argparse.Namespace) -> int:
    blobs, entries = _open(settings)
    cmd = args.cache_command
    if cmd == "stats":
        print(json.dumps({"blobs": blobs.count, "entries": entries.count, "size_bytes": blobs.size,
                          "size": _human(blobs.size), "max_size_bytes": blobs.max_size,
                          "root": str(blobs.root)}, indent=2))
        return 0
    if cmd == "ls":
        now = time.time()
        for e in entries.iter_entries():
            fresh = "fresh" if e.is_fresh(now) else "stale"
            age = int(now - e.validated_at)
            print(f"{e.kind:13} {e.status:3} {_human(e.body_size):>10} {age:>8}s {fresh:5} {e.key}")
        return 0
    if cmd == "purge":
        cutoff = time.time() - parse_duration(args.older_than, "--older-than") if args.older_than else None
        removed = 0
        for e in list(entries.iter_entries()):
            if args.host and e.meta.get("host") != args.host and f"|{args.host}" not in e.key:
                continue
            if args.repo and f"/{args.repo}" not in (e.meta.get("reference") or "") and \
                    f"/{args.repo}:" not in e.key:
                continue
            if cutoff is not None and e.validated_at > cutoff:
                continue
            _delete_sync(entries, e.key)
            removed += 1
        # blobs no entry refers to any more are garbage
        referenced = {e.body_digest for e in entries.iter_entries() if e.body_digest}
        dropped = [d for d in blobs.digests() if d not in referenced]
        for d in dropped:
            blobs.remove(d)
        if removed or dropped:
            entries.mark_purged()                # a running gateway drops what memory holds
        print(f"removed {removed} entries and {len(dropped)} unreferenced blobs", file=sys.stderr)
        return 0
    if cmd == "verify":
        bad = [d for d in blobs.digests() if not blobs.verify(d)]
        if bad:
            entries.mark_purged()
        print(f"verified {blobs.count + len(bad)} blobs, removed {len(bad)} corrupt", file=sys.stderr)
        for d in bad:
            print(d)
        return 1 if bad else 0
    return 2


def _delete_sync(entries: EntryStore, key: str) -> None:
    entries._path(key).unlink(missing_ok=True)  # noqa: SLF001 - same package
