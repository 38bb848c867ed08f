"""``trivy-gateway bundle import FILE``: verify everything, then publish, or store nothing.

The bundle is read once, as a stream (bounded memory whatever its size):

1. ``manifest.json`` (first member) lists every member with its sha256 and size.
2. Each further member must be listed, a regular file, of the listed size, seen once; any other
   name (``../x``, an absolute path, a link) refuses the bundle. Entries (small JSON) are hashed
   and parsed in memory; bodies stream into the blob store's own fills (hashed while written,
   into ``tmp/``) and are *sealed* — verified and flushed, not published.
3. At the end every listed member must have arrived (a truncated bundle is refused), and with
   ``--signature`` the signature over the whole file is checked.
4. Only then: the fills are published (the blob store's atomic rename), the entries written
   (an entry the cache already holds in a newer version is kept), and the operator marker
   touched, so a running gateway on the same data directory serves the new content within a
   second. Any failure before step 4 discards every staged fill: nothing from the bundle stays.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..cache import BlobStore, DigestMismatch, Entry, EntryStore, Fill, FillFailed, StoreFull
from .bundle import (BLOB_MEMBER, COPY_CHUNK, ENTRY_MEMBER, FORMAT, FORMAT_VERSION,
                     MANIFEST_DIGEST_NAME, MANIFEST_NAME, MAX_ENTRY_BYTES, MAX_MANIFEST_BYTES,
                     BundleError)
from .progress import Progress, human
from .signature import SignatureError, load_public_key, read_signature, verify_digest


@dataclass
class ImportResult:
    entries_written: int
    entries_kept: int
    blobs_added: int
    blobs_present: int
    bytes_read: int


class _HashingReader(io.RawIOBase):
    """The bundle file as tarfile reads it, hashed on the way (for the signature check)."""

    def __init__(self, f) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()
        self.pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha256.update(data)
        self.pos += len(data)
        return data

    def drain(self) -> None:
        """Hash the rest of the file (tar end blocks, padding)."""
        while self.read(COPY_CHUNK):
            pass


def _check_manifest(doc: object) -> dict[str, dict]:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError("not a trivy-gateway bundle (manifest.json has no "
                          f"\"format\": \"{FORMAT}\")")
    if doc.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle format version {doc.get('format_version')!r} is not supported "
                          f"by this gateway (it reads version {FORMAT_VERSION})")
    members: dict[str, dict] = {}
    for m in doc.get("members") or []:
        name = m.get("name") if isinstance(m, dict) else None
        match = (ENTRY_MEMBER.match(name) or BLOB_MEMBER.match(name)) if isinstance(name, str) \
            else None
        if match is None or not isinstance(m.get("size"), int) or m["size"] < 0 \
                or m.get("sha256") != match.group("hex") or name in members:
            raise BundleError(f"manifest.json lists an invalid member {name!r}")
        members[name] = m
    return members


def _printable(value: object) -> str:
    """Text from the (not yet verified) manifest, safe to print on a terminal."""
    return "".join(c if c.isprintable() else "?" for c in str(value))[:200]


def _checked_entry(e: Entry) -> Entry:
    """Field types of an entry from the bundle, checked before anything is published (an entry
    that fails later, half-way through publishing, would leave part of the bundle behind)."""
    numbers = (e.validated_at, e.fresh_until, e.stored_at)
    if not (isinstance(e.key, str) and e.key and isinstance(e.kind, str)
            and isinstance(e.status, int) and isinstance(e.body_size, int)
            and all(isinstance(n, (int, float)) for n in numbers)
            and all(len(h) == 2 and all(isinstance(x, str) for x in h) for h in e.headers)
            and isinstance(e.meta, dict)
            and (e.body_digest is None or isinstance(e.body_digest, str)
                 and BLOB_MEMBER.match("blobs/sha256/" + e.body_digest.removeprefix("sha256:"))
                 and e.body_digest.startswith("sha256:"))):
        raise ValueError("a field has the wrong type")
    return e


def _read_all(f, size: int, limit: int, name: str) -> bytes:
    if size > limit:
        raise BundleError(f"member {name} is {size} bytes, more than the {limit} allowed")
    data = f.read(size + 1)
    if len(data) != size:
        raise BundleError(f"member {name} is truncated")
    return data


class _Staging:
    """Verified, sealed fills and parsed entries, published together or discarded together."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self.fills: list[Fill] = []
        self.entries: list[Entry] = []
        self.present = 0

    def blob(self, name: str, expected: dict, f, progress: Progress) -> None:
        digest = "sha256:" + expected["sha256"]
        size = expected["size"]
        if self.blobs.has(digest):
            # already cached: still read and hash it, so a tampered member refuses the bundle
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(COPY_CHUNK), b""):
                h.update(chunk)
                progress.advance(len(chunk))
            if "sha256:" + h.hexdigest() != digest:
                raise BundleError(f"member {name} does not match its digest (the bundle was "
                                  "changed or damaged in transit)")
            self.present += 1
            return
        try:
            fill = self.blobs.begin_fill(digest, size, evict=False)
        except StoreFull as exc:
            raise BundleError(f"no room for {name} ({human(size)}): {exc}") from None
        self.fills.append(fill)
        if size > 64 * COPY_CHUNK:
            progress.note(f"blob {digest[:19]}… {human(size)}")
        for chunk in iter(lambda: f.read(COPY_CHUNK), b""):
            fill.write(chunk)
            progress.advance(len(chunk))
        try:
            fill.seal()
        except DigestMismatch as exc:
            raise BundleError(f"member {name} does not match its digest ({exc}; the bundle was "
                              "changed or damaged in transit)") from None

    def discard(self) -> None:
        for fill in self.fills:
            fill.fail(BundleError("bundle refused"))
        self.fills.clear()

    def publish(self) -> int:
        for fill in self.fills:
            fill.commit()
        return len(self.fills)


def _stage(tar: tarfile.TarFile, staging: _Staging, stderr) -> tuple[dict, Progress]:
    first = tar.next()
    if first is None or first.name != MANIFEST_NAME or not first.isfile():
        raise BundleError(f"the first member must be {MANIFEST_NAME} "
                          f"(found {first.name if first else 'nothing'!r})")
    raw = _read_all(tar.extractfile(first), first.size, MAX_MANIFEST_BYTES, MANIFEST_NAME)
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"{MANIFEST_NAME} is not valid JSON: {exc}") from None
    expected = _check_manifest(manifest)
    print(f"bundle from trivy-gateway {_printable(manifest.get('gateway_version'))}, created "
          f"{_printable(manifest.get('created_at'))}: {len(expected)} members, "
          f"{human(sum(m['size'] for m in expected.values()))}", file=stderr)
    for art in manifest.get("artifacts") or []:
        if isinstance(art, dict):
            print(f"artifact {_printable(art.get('artifact'))}: {_printable(art.get('reference'))}"
                  f" @ {_printable(art.get('manifest_digest'))}", file=stderr)
    new_bytes = sum(m["size"] for n, m in expected.items() if BLOB_MEMBER.match(n)
                    and not staging.blobs.has("sha256:" + m["sha256"]))
    if new_bytes > staging.blobs.max_size:
        raise BundleError(f"the bundle adds {human(new_bytes)}, more than the whole cache budget "
                          f"(cache.max_size {human(staging.blobs.max_size)})")
    progress = Progress("import", sum(m["size"] for m in expected.values()), stderr)
    seen: set[str] = set()
    manifest_verified = False
    while True:
        member = tar.next()
        if member is None:
            break
        name = member.name
        if manifest_verified:
            raise BundleError(f"member {name!r} after {MANIFEST_DIGEST_NAME} (tampered bundle)")
        if name == MANIFEST_DIGEST_NAME and member.isfile():
            text = _read_all(tar.extractfile(member), member.size, 100, name)
            if text.strip().decode("ascii", "replace") != hashlib.sha256(raw).hexdigest():
                raise BundleError(f"{MANIFEST_NAME} does not match its digest (the bundle was "
                                  "changed or damaged in transit)")
            manifest_verified = True
            continue
        if name not in expected:
            raise BundleError(f"unexpected member {name!r} (not listed in {MANIFEST_NAME}; "
                              "path traversal or a tampered bundle)")
        if name in seen:
            raise BundleError(f"member {name!r} appears twice")
        if not member.isfile() or member.size != expected[name]["size"]:
            raise BundleError(f"member {name!r} is not a regular file of the listed size")
        seen.add(name)
        f = tar.extractfile(member)
        if ENTRY_MEMBER.match(name):
            data = _read_all(f, member.size, MAX_ENTRY_BYTES, name)
            if hashlib.sha256(data).hexdigest() != expected[name]["sha256"]:
                raise BundleError(f"member {name} does not match its digest (the bundle was "
                                  "changed or damaged in transit)")
            try:
                staging.entries.append(_checked_entry(Entry.from_json(data.decode())))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise BundleError(f"member {name} is not a cache entry: {exc}") from None
            progress.advance(len(data))
        else:
            staging.blob(name, expected[name], f, progress)
    missing = sorted(set(expected) - seen) + ([] if manifest_verified else [MANIFEST_DIGEST_NAME])
    if missing:
        raise BundleError(f"the bundle is truncated or incomplete: {len(missing)} of "
                          f"{len(expected) + 1} members missing (first: {missing[0]})")
    bundled = {"sha256:" + m["sha256"] for n, m in expected.items() if BLOB_MEMBER.match(n)}
    for e in staging.entries:
        if e.body_digest and e.body_digest not in bundled and not staging.blobs.has(e.body_digest):
            raise BundleError(f"entry {e.key!r} needs body {e.body_digest}, which is neither in "
                              "the bundle nor in the cache")
    return manifest, progress


async def import_bundle(blobs: BlobStore, entries: EntryStore, path: Path, *,
                        signature: Optional[Path] = None, public_key: Optional[Path] = None,
                        stderr=None) -> ImportResult:
    """See the module docstring. Raises :class:`BundleError` (nothing stored) on any problem."""
    stderr = stderr or sys.stderr
    key = load_public_key(public_key) if public_key else None
    sig = read_signature(signature) if signature else None
    if (key is None) != (sig is None):
        raise BundleError("--signature and --public-key go together")
    staging = _Staging(blobs)
    try:
        raw_file = open(path, "rb")
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None
    with raw_file:
        reader = _HashingReader(raw_file)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                manifest, progress = _stage(tar, staging, stderr)
            reader.drain()
            if key is not None:
                verify_digest(reader.sha256.digest(), sig, key)
                print("signature OK", file=stderr)
        except (tarfile.TarError, EOFError) as exc:
            staging.discard()
            raise BundleError(f"{path} is damaged or truncated ({exc})") from None
        except SignatureError as exc:
            staging.discard()
            raise BundleError(str(exc)) from None
        except (StoreFull, FillFailed) as exc:
            staging.discard()
            raise BundleError(f"cannot stage the bundle in the cache: {exc}") from None
        except BaseException:
            staging.discard()
            raise
    added = staging.publish()
    written = kept = 0
    for e in staging.entries:
        current = await entries.get(e.key)
        if current is not None and current[0].validated_at >= e.validated_at \
                and not current[0].negative:
            kept += 1
            continue
        await entries.put(e)
        written += 1
    entries.mark_purged()  # a running gateway re-reads the cache directory within a second
    progress.finish(f"imported {written} entries ({kept} already newer in the cache), "
                    f"{added} new blobs ({staging.present} already present)")
    return ImportResult(written, kept, added, staging.present, reader.pos)
