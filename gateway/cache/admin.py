"""Operator commands on the cache directory: ``cache stats | ls | purge | verify``.

They work on the files directly, so they also run while the gateway is up: after a purge (or a
verify that removed blobs) they touch a marker file that a running gateway checks once a second,
and it then forgets the entries and small bodies it holds in memory; an entry whose body blob has
disappeared is a miss.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Optional

from ..observability.metrics import Metrics
from ..settings import Settings, parse_duration
from .blobstore import BlobStore
from .entries import Entry, EntryStore


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
    if kind == "oci-ping":
        what = f"{what} (registry ping)"
    elif kind == "oci-token":
        what = f"{what} (token)"
    what = _DIGEST.sub(r"\1…", what)
    if kind in ("blob", "manifest", "tag") and parts[-1] not in ("public", "anonymous", ""):
        what += "  [private: fetched with credentials]"
    return what


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
        raw = getattr(args, "keys", False)
        print(f"{'KIND':13} {'STATUS':6} {'SIZE':>10} {'CHECKED':>8} {'STATE':5} "
              f"{'KEY' if raw else 'RESOURCE'}")
        for e in entries.iter_entries():
            fresh = "fresh" if e.is_fresh(now) else "stale"
            age = _age(now - e.validated_at)
            print(f"{e.kind:13} {e.status:<6} {_human(e.body_size):>10} {age:>8} {fresh:5} "
                  f"{e.key if raw else readable_key(e.key)}")
        return 0
    if cmd == "purge":
        cutoff = time.time() - parse_duration(args.older_than, "--older-than") if args.older_than else None
        removed = 0
        for e in list(entries.iter_entries()):
            if not purge_selects(e, args.host, args.repo):
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
