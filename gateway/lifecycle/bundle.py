"""Air-gap bundles, the format and ``trivy-gateway bundle export``.

A bundle is one uncompressed tar (the DB layers are gzip already; a second compression costs
CPU and gains nothing), written and read as a stream, never a whole body in memory::

    manifest.json                  what is inside, with the sha256 and size of every member
    entries/<sha256>.json          cached responses (the gateway's Entry JSON, named by its digest)
    blobs/sha256/<hex>             bodies, named by their digest
    manifest.sha256                the sha256 of manifest.json: last, so a damaged manifest
                                   (or a bundle cut short) is noticed too

``manifest.json`` comes first, so an import knows every digest before the first byte of a body
arrives and can refuse any member it does not list (path traversal, extra or missing members).
The entries are copied as the cache holds them, keys included: a bundle never builds a cache key,
so it stays correct whatever the key layout of the gateway version that wrote it (that version is
in the manifest; an importer of another key layout would just not find the entries).

What is selected: for each chosen artifact the generation its cached tags point at (tag
manifests, the manifests by digest, the config and layer blobs) and the registry auth answers;
with ``--maven`` every cached Maven answer, with ``--vex`` every cached GitHub answer (VEX Hub).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .. import __version__
from ..cache import BlobStore, Entry, EntryStore
from .progress import Progress, human

FORMAT = "trivy-gateway-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_DIGEST_NAME = "manifest.sha256"
#: upper bounds for members read into memory on import (anything larger is refused)
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_ENTRY_BYTES = 1024 * 1024
#: CLI artifact names → the artifact names cached entries carry (``Entry.meta["artifact"]``)
ARTIFACT_NAMES = {
    "trivy-db": "vulnerability_db",
    "trivy-java-db": "java_db",
    "trivy-checks": "checks_bundle",
}
ENTRY_MEMBER = re.compile(r"^entries/(?P<hex>[0-9a-f]{64})\.json$")
BLOB_MEMBER = re.compile(r"^blobs/sha256/(?P<hex>[0-9a-f]{64})$")
COPY_CHUNK = 1024 * 1024


class BundleError(Exception):
    """The bundle cannot be written or is refused; the message says why, for the operator."""


@dataclass
class Selection:
    """What an export will write: entries (with their JSON) and the blobs they need."""

    entries: list[tuple[Entry, bytes]] = field(default_factory=list)
    blobs: dict[str, int] = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.blobs.values()) + sum(len(j) for _, j in self.entries)


def parse_artifacts(value: Optional[str]) -> list[str]:
    """``trivy-db,trivy-java-db`` → internal artifact names; clear error for unknown ones."""
    if not value:
        return list(ARTIFACT_NAMES.values())
    out = []
    for name in (v.strip() for v in value.split(",")):
        if not name:
            continue
        if name in ARTIFACT_NAMES:
            out.append(ARTIFACT_NAMES[name])
        elif name in ARTIFACT_NAMES.values():
            out.append(name)
        else:
            raise BundleError(f"unknown artifact {name!r} (known: {', '.join(ARTIFACT_NAMES)})")
    return out


def _is_tag_entry(e: Entry) -> bool:
    return e.kind == "oci_manifest" and "@sha256:" not in str(e.meta.get("reference") or "@sha256:")


def _manifest_children(blobs: BlobStore, digest: str) -> tuple[set[str], list[dict], dict]:
    """Digests an OCI manifest (or index) refers to, its layers, and its annotations."""
    raw = blobs.read_small(digest, 4 * 1024 * 1024)
    try:
        doc = json.loads(raw or b"{}")
    except ValueError:
        return set(), [], {}
    if not isinstance(doc, dict):
        return set(), [], {}
    refs: set[str] = set()
    layers = [d for d in doc.get("layers") or [] if isinstance(d, dict)]
    for d in [doc.get("config") or {}, *layers, *(doc.get("manifests") or [])]:
        if isinstance(d, dict) and isinstance(d.get("digest"), str):
            refs.add(d["digest"])
    return refs, layers, doc.get("annotations") or {}


def select(blobs: BlobStore, entries: EntryStore, artifacts: Iterable[str], maven: bool,
           vex: bool) -> Selection:
    """Pick the entries and blobs to export (see the module docstring)."""
    wanted = set(artifacts)
    all_entries = list(entries.iter_entries())
    sel = Selection()
    manifests: set[str] = set()
    referenced: set[str] = set()
    for e in all_entries:
        if not (_is_tag_entry(e) and e.meta.get("artifact") in wanted and e.body_digest):
            continue
        refs, layers, annotations = _manifest_children(blobs, e.body_digest)
        manifests.add(e.body_digest)
        referenced |= refs
        for child in refs:  # an index: its manifests' layers too
            child_refs, _, _ = _manifest_children(blobs, child)
            referenced |= child_refs
        sel.artifacts.append({
            "artifact": e.meta["artifact"], "reference": e.meta.get("reference"),
            "manifest_digest": e.body_digest, "validated_at": e.validated_at,
            "layers": [{"digest": d.get("digest"), "size": d.get("size"),
                        "media_type": d.get("mediaType")} for d in layers],
            "annotations": annotations,
        })
    for e in all_entries:
        if e.kind == "oci_manifest":
            take = e.body_digest in manifests or e.body_digest in referenced
        elif e.kind == "oci_blob":
            take = e.body_digest in referenced
        elif e.kind == "oci_auth":
            take = bool(manifests)
        elif e.kind == "maven":
            take = maven
        elif e.kind == "github":
            take = vex
        else:
            take = False
        if not take:
            continue
        if e.body_digest:
            size = blobs.size_of(e.body_digest)
            if size is None:
                continue  # the body is gone (evicted): the entry is a miss anyway
            sel.blobs[e.body_digest] = size
        sel.entries.append((e, e.to_json().encode()))
        sel.counts[e.kind] = sel.counts.get(e.kind, 0) + 1
    return sel


def build_manifest(sel: Selection, created_at: Optional[float] = None) -> dict:
    members = [{"name": f"entries/{hashlib.sha256(j).hexdigest()}.json",
                "sha256": hashlib.sha256(j).hexdigest(), "size": len(j)} for _, j in sel.entries]
    members += [{"name": f"blobs/sha256/{d.split(':', 1)[1]}", "sha256": d.split(":", 1)[1],
                 "size": size} for d, size in sorted(sel.blobs.items())]
    created = time.time() if created_at is None else created_at
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gateway_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "created_at_unix": created,
        "artifacts": sel.artifacts,
        "counts": sel.counts,
        "total_bytes": sel.total_bytes,
        "members": members,
    }


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    return info


def export_bundle(blobs: BlobStore, entries: EntryStore, out: Path, artifacts: list[str],
                  maven: bool, vex: bool, stderr=None) -> dict:
    """Write the bundle to ``out`` (via ``out.partial`` + rename: an interrupted export never
    leaves a file that looks complete). Returns the manifest."""
    stderr = stderr or sys.stderr
    sel = select(blobs, entries, artifacts, maven, vex)
    if not sel.entries:
        raise BundleError("nothing to export: the cache holds none of the selected content "
                          "(warm it first, or choose --artifacts/--maven/--vex)")
    manifest = build_manifest(sel)
    for art in sel.artifacts:
        print(f"artifact {art['artifact']}: {art['reference']} @ {art['manifest_digest']}",
              file=stderr)
    progress = Progress("export", sel.total_bytes, stderr)
    partial = out.with_name(out.name + ".partial")
    now = time.time()
    try:
        with open(partial, "wb") as raw, tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT,
                                                      copybufsize=COPY_CHUNK) as tar:
            data = json.dumps(manifest, indent=1).encode()
            tar.addfile(_tarinfo(MANIFEST_NAME, len(data), now), io.BytesIO(data))
            for (_, text), member in zip(sel.entries, manifest["members"]):
                tar.addfile(_tarinfo(member["name"], len(text), now), io.BytesIO(text))
                progress.advance(len(text))
            for member in manifest["members"][len(sel.entries):]:
                digest = "sha256:" + member["sha256"]
                try:
                    f = open(blobs.path_of(digest), "rb")
                except FileNotFoundError:
                    raise BundleError(f"blob {digest} vanished during the export (evicted by a "
                                      "running gateway?); run the export again") from None
                with f:
                    if os.fstat(f.fileno()).st_size != member["size"]:
                        raise BundleError(f"blob {digest} changed size during the export")
                    if member["size"] > 64 * COPY_CHUNK:
                        progress.note(f"blob {digest[:19]}… {human(member['size'])}")
                    tar.addfile(_tarinfo(member["name"], member["size"], now),
                                _Counting(f, progress))
            digest = hashlib.sha256(data).hexdigest().encode() + b"\n"
            tar.addfile(_tarinfo(MANIFEST_DIGEST_NAME, len(digest), now), io.BytesIO(digest))
        with open(partial, "rb+") as raw:
            os.fsync(raw.fileno())
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    progress.finish(f"exported {len(sel.entries)} entries and {len(sel.blobs)} blobs to {out}")
    return manifest


class _Counting(io.RawIOBase):
    """A file read by tarfile's copy loop, reporting progress as it goes."""

    def __init__(self, f, progress: Progress) -> None:
        self.f = f
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.progress.advance(len(data))
        return data
