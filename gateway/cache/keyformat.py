"""Entries stored under an older key format: renamed when provably the same, dropped otherwise.

Why: cache keys gained the upstream scheme and the forwarded query (issue 10, D3/D10). A gateway
upgraded in place keeps its cache directory, but an entry stored under the old key would never be
looked up again: the first scan after the upgrade would re-download every database from
rate-limited registries while the old entries and their bodies sat on disk until evicted.

What may be renamed is decided by the resources layer, which owns the key formats (a
:class:`KeyUpgrade`: this layer must not import it); this module does the file work, once:

- pass 1 renames each old entry the upgrade maps to a new key (new file written atomically, then
  the old one removed) and notes the body digests of the entries it drops;
- pass 2 (only when something is dropped) keeps the digests any remaining entry still uses;
- the bodies no entry uses any more are removed from the blob store, *then* the dropped entry
  files (pass 3), so a crash between the two leaves entries whose body is gone, which
  :meth:`EntryStore.open` drops, never an unreferenced body;
- the marker file (:data:`~gateway.cache.entries.FORMAT_MARKER`) is written last: until it is,
  every start runs the migration again, which is idempotent (an entry already renamed is found
  under its new key and the old file is removed). An entry whose rename fails (I/O error) stays
  as it is and the marker is not written, so the next start tries again.

Memory: one entry at a time, plus the set of digests of dropped entries (at most the blob index
the blob store already holds). Each pass re-reads the directory; it runs once per format change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..observability.logging import get_logger
from .entries import FORMAT_MARKER, Entry, EntryStore, write_atomically

log = get_logger("gateway.cache")


@dataclass(frozen=True)
class KeyUpgrade:
    """How to recognise keys of older formats and what each becomes (supplied by the resources
    layer, :data:`gateway.resources.legacy.KEY_UPGRADE`)."""

    #: the key format the current code stores under (written to the marker file)
    format: int
    #: is this key in an older format?
    is_legacy: Callable[[str], bool]
    #: the key an old entry is stored under now, or None when it cannot be proven to mean the
    #: same request (it is dropped)
    new_key: Callable[[Entry], Optional[str]]


@dataclass
class KeyMigration:
    """What one migration did (logged once, returned for tests and the caller)."""

    migrated: int = 0
    dropped: int = 0
    #: old entries left for the next start (their rename failed with an I/O error)
    failed: int = 0
    blobs_released: int = 0
    bytes_released: int = 0


def stored_format(directory: Path) -> int:
    """The key format the marker names; 1 (the first format, which had no marker) without one."""
    try:
        return int((directory / FORMAT_MARKER).read_text("utf-8").strip())
    except (OSError, ValueError):
        return 1


def migrate_keys(store: EntryStore, upgrade: KeyUpgrade) -> Optional[KeyMigration]:
    """Bring ``store``'s directory to ``upgrade.format`` (call before :meth:`EntryStore.open`,
    with its blob store open). None when the marker says it is done already."""
    store.dir.mkdir(parents=True, exist_ok=True)
    if stored_format(store.dir) >= upgrade.format:
        return None
    report = KeyMigration()
    released: set[str] = set()
    for path, entry in _legacy(store, upgrade):
        target = _target(store, upgrade, entry)
        if target is None:
            report.dropped += 1
            if entry.body_digest:
                released.add(entry.body_digest)
            continue
        try:
            renamed = dataclasses.replace(entry, key=upgrade.new_key(entry))
            if not _holds(target, renamed):
                write_atomically(target, renamed.to_json())
            path.unlink(missing_ok=True)
        except OSError as exc:
            report.failed += 1
            log.warning("cache_key_migration_failed", file=path.name, error=str(exc))
            continue
        report.migrated += 1
    if released:
        for _, entry in _entries(store):
            if entry.body_digest in released and not (
                    upgrade.is_legacy(entry.key) and _target(store, upgrade, entry) is None):
                released.discard(entry.body_digest)
        for digest in released:
            size = store.blobs.size_of(digest) or 0
            if store.blobs.remove(digest):
                report.blobs_released += 1
                report.bytes_released += size
    if report.dropped:
        for path, entry in _legacy(store, upgrade):
            if _target(store, upgrade, entry) is None:
                path.unlink(missing_ok=True)
    if report.failed:
        log.warning("cache_keys_migrated", **dataclasses.asdict(report), format=upgrade.format,
                    note="the entries that failed are tried again at the next start")
        return report
    try:
        write_atomically(store.dir / FORMAT_MARKER, f"{upgrade.format}\n")
    except OSError as exc:  # the next start looks again and finds nothing left to do
        log.warning("cache_key_format_marker_failed", error=str(exc))
    if report.migrated or report.dropped:
        log.info("cache_keys_migrated", **dataclasses.asdict(report), format=upgrade.format)
    return report


def _target(store: EntryStore, upgrade: KeyUpgrade, entry: Entry) -> Optional[Path]:
    """Where an old entry goes, or None: drop it. Dropped: no new key for it, its body is gone,
    or an entry of the current format already holds the new key with other content (stored
    since the upgrade by the current code: it wins). A target that does not read as an entry
    (torn) is written over."""
    if entry.body_digest and not store.blobs.has(entry.body_digest):
        return None
    key = upgrade.new_key(entry)
    if key is None:
        return None
    target = store._path(key)  # noqa: SLF001 - same package: the entry file layout
    held = _read(target)
    if held is not None and held.key == key and held.body_digest != entry.body_digest:
        return None
    return target


def _holds(target: Path, renamed: Entry) -> bool:
    """Does ``target`` already hold ``renamed`` (written by an interrupted run)?"""
    held = _read(target)
    return held is not None and (held.key, held.body_digest) == (renamed.key,
                                                                 renamed.body_digest)


def _legacy(store: EntryStore, upgrade: KeyUpgrade) -> Iterator[tuple[Path, Entry]]:
    for path, entry in _entries(store):
        if upgrade.is_legacy(entry.key):
            yield path, entry


def _entries(store: EntryStore) -> Iterator[tuple[Path, Entry]]:
    """Every readable entry file, one at a time (unreadable ones are :meth:`EntryStore.open`'s
    to remove)."""
    for path in store.dir.glob("*.json"):
        entry = _read(path)
        if entry is not None:
            yield path, entry


def _read(path: Path) -> Optional[Entry]:
    try:
        return Entry.from_json(path.read_text("utf-8"))
    except (ValueError, TypeError, KeyError, OSError):
        return None
