"""``trivy-gateway bundle export|import``: the command-line side of :mod:`.bundle`.

Both work on the data directory's cache directly, like ``cache …``, so they also run beside a
running gateway (an import is served by it within a second; see :mod:`.bundle_import`). Exit
codes: 0 done, 1 refused or failed (the message says why; nothing was stored), 2 usage.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parser is built for every command; the stores only for `bundle`
    from ..cache import BlobStore, EntryStore
    from ..settings import Settings


def add_bundle_parser(sub, add_config_flags) -> None:
    bundle = sub.add_parser("bundle", help="air-gap bundles: export cached artifacts to one "
                            "file, import them elsewhere")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    p = bundle_sub.add_parser("export", help="write selected cached content to one archive")
    add_config_flags(p)
    p.add_argument("--artifacts", help="comma-separated: trivy-db, trivy-java-db, trivy-checks "
                   "(default: all three)")
    p.add_argument("--maven", action="store_true", help="also every cached Maven answer (POMs)")
    p.add_argument("--vex", action="store_true", help="also the cached VEX Hub (GitHub) answers")
    p.add_argument("-o", "--output", required=True, help="the bundle file to write")
    p = bundle_sub.add_parser("import", help="verify a bundle and merge it into the cache")
    add_config_flags(p)
    p.add_argument("file", help="the bundle file")
    p.add_argument("--signature", help="detached signature of the file (openssl dgst -sha256 "
                   "-sign, or cosign sign-blob)")
    p.add_argument("--public-key", dest="public_key", help="PEM public key for --signature")


def _open(settings: "Settings", clean_tmp: bool) -> tuple["BlobStore", "EntryStore"]:
    from ..cache import BlobStore, EntryStore  # noqa: PLC0415
    from ..observability.metrics import Metrics  # noqa: PLC0415

    root = settings.data_dir / "cache"
    metrics = Metrics()
    blobs = BlobStore(root, settings.cache.max_size, settings.cache.min_free_space, metrics)
    blobs.open(clean_tmp=clean_tmp)
    entries = EntryStore(root, blobs, settings.cache.memory, metrics)
    entries.open()
    return blobs, entries


def _union_of_tiers(settings: "Settings"):
    """Every local tier of the data dir as one store: with ``server.workers`` each worker holds
    what it served in ``<data_dir>/workers/<i>``, and an export must see all of them."""
    from ..cache.admin import open_tier  # noqa: PLC0415
    from ..cache.tiers import TierUnion, cache_tiers  # noqa: PLC0415

    tiers = cache_tiers(settings.data_dir)
    if not tiers:
        _open(settings, clean_tmp=False)   # no tier at all: the single-process one, as before
        tiers = cache_tiers(settings.data_dir)
    return TierUnion([open_tier(settings, t) for t in tiers])


def run_bundle_command(settings: "Settings", args: argparse.Namespace) -> int:
    from .bundle import BundleError, export_bundle, parse_artifacts  # noqa: PLC0415
    from .bundle_import import import_bundle  # noqa: PLC0415
    from .signature import SignatureError  # noqa: PLC0415

    try:
        if args.bundle_command == "export":
            union = _union_of_tiers(settings)
            export_bundle(union, union, Path(args.output), parse_artifacts(args.artifacts),
                          args.maven, args.vex)
            return 0
        if not Path(args.file).is_file():
            print(f"trivy-gateway: bundle import: {args.file}: no such file", file=sys.stderr)
            return 1
        blobs, entries = _open(settings, clean_tmp=False)
        asyncio.run(import_bundle(
            blobs, entries, Path(args.file),
            signature=Path(args.signature) if args.signature else None,
            public_key=Path(args.public_key) if args.public_key else None))
        return 0
    except OSError as exc:
        print(f"trivy-gateway: bundle {args.bundle_command}: {exc.filename or ''}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    except (BundleError, SignatureError) as exc:
        verb = args.bundle_command
        tail = " Nothing was imported." if verb == "import" else ""
        print(f"trivy-gateway: bundle {verb}: refused: {exc}.{tail}", file=sys.stderr)
        return 1
