"""CLI commands on the gateway's state: ``ca init | export | bundle`` and the cache guard.

Only ``serve`` and ``ca init`` create state. Commands that read it fail with exit code 1 and a
hint when it is missing: a CA silently created in the wrong directory is a CA no scanner trusts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .settings import Settings


class StateMissing(Exception):
    """A read-only command found no gateway state where the configuration points."""


def data_dir_hint(settings: Settings) -> str:
    return (f"server.data_dir is {settings.server.data_dir!r} (from "
            f"{settings.origin('server.data_dir')}, cwd {Path.cwd()}); pass the gateway's "
            "--config or --data-dir")


def ca_command(settings: Settings, args: argparse.Namespace) -> int:
    from .startup import ca_error  # noqa: PLC0415
    from .tls.ca import CAError, CertificateAuthority, bundle_from_pem  # noqa: PLC0415

    if args.ca_command == "init":   # the one ca command that may create state, by its name
        operator = bool(settings.tls.ca_cert)      # the operator's CA: nothing to create
        try:
            if not operator:
                settings.data_dir.mkdir(parents=True, exist_ok=True)
            ca = CertificateAuthority.load_or_create(settings)
        except OSError as exc:
            raise StateMissing(f"cannot create the CA: {exc.strerror}: {exc.filename} "
                               f"({data_dir_hint(settings)})") from None
        except CAError as exc:
            if operator:
                raise settings.error(f"tls.ca_{exc.part}", str(exc)) from None
            raise StateMissing(str(ca_error(settings, exc))) from None
        print(f"gateway CA {ca.cert_path} sha256={ca.fingerprint_sha256}", file=sys.stderr)
        return 0
    pem = fetch_ca(args.from_url) if args.from_url else read_ca(settings)
    sys.stdout.write(pem.decode("ascii") if args.ca_command == "export" else bundle_from_pem(pem))
    return 0


def read_ca(settings: Settings) -> bytes:
    """The CA certificate(s) the gateway uses, read without the key and never created."""
    if settings.tls.ca_cert:
        path, origin = Path(settings.tls.ca_cert), f"tls.ca_cert from {settings.origin('tls.ca_cert')}"
    else:
        from .tls.ca import CA_CERT_FILE, CA_DIR  # noqa: PLC0415

        path, origin = settings.data_dir / CA_DIR / CA_CERT_FILE, data_dir_hint(settings)
    try:
        return checked_pem(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise StateMissing(f"no gateway CA at {path}: {origin}. The CA is created by "
                           "`trivy-gateway serve`; on a scanner host use "
                           "`trivy-gateway ca bundle --from http://GATEWAY:9128`") from None
    except OSError as exc:
        raise StateMissing(f"cannot read the gateway CA {path}: {exc.strerror}") from None


def fetch_ca(url: str) -> bytes:
    """GET ``URL/ca.pem`` from a running gateway's admin port, bypassing any *_proxy variable
    (the gateway is the proxy; asking it through itself would fail)."""
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    target = url.rstrip("/")
    if not target.endswith("/ca.pem"):
        target += "/ca.pem"
    if "://" not in target:
        target = "http://" + target
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(target, timeout=15) as response:
            body = response.read(1024 * 1024)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise StateMissing(f"cannot fetch the CA from {target}: {reason}") from None
    return checked_pem(body, target)


def checked_pem(data: bytes, where: str) -> bytes:
    """Only well-formed CA certificates go to stdout (a scanner would trust whatever we print)."""
    from cryptography import x509  # noqa: PLC0415

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise StateMissing(f"{where} does not hold a PEM certificate") from None
    try:
        is_ca = certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise StateMissing(f"{where}: the first certificate is not a CA certificate")
    from cryptography.hazmat.primitives.serialization import Encoding  # noqa: PLC0415

    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def cache_command(settings: Settings, args: argparse.Namespace) -> int:
    """``cache …`` on every local tier of the data dir (one per worker with ``server.workers``)."""
    from .cache.tiers import cache_tiers  # noqa: PLC0415

    if not cache_tiers(settings.data_dir):
        raise StateMissing(f"no gateway cache at {settings.data_dir / 'cache'} nor under "
                           f"{settings.data_dir / 'workers'}: {data_dir_hint(settings)}")
    if args.cache_command == "purge" and not (args.host or args.repo or args.older_than
                                              or args.purge_all):
        print("trivy-gateway: cache purge needs a filter (--host, --repo, --older-than) or "
              "--all to remove every entry", file=sys.stderr)
        return 2
    from .cache.admin import run_cache_command  # noqa: PLC0415 - only for this command
    from .shared import shared_memory_front  # noqa: PLC0415

    return run_cache_command(settings, args, shared_memory_front(settings))
