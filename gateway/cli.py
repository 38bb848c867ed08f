"""Command line: ``trivy-gateway serve | ca export | ca bundle | check-config | cache …``.

Every command that needs configuration loads it the same way (embedded default → ``--config`` →
env → flags) and reports a bad file with the key and the file name, exit code 2.

Only ``serve`` creates state (the data dir, the CA, the cache). Commands that read it (``ca
export``, ``ca bundle``, ``cache …``) fail with exit code 1 and a hint when it is missing: a CA
silently created in the wrong directory is a CA no scanner trusts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .settings import (ConfigError, Settings, load_settings, parse_duration, settings_digest,
                       settings_view)


class StateMissing(Exception):
    """A read-only command found no gateway state where the configuration points."""


def _overrides(args: argparse.Namespace) -> dict:
    server = {}
    for flag, key in (("listen", "listen"), ("admin_listen", "admin_listen"),
                      ("data_dir", "data_dir")):
        value = getattr(args, flag, None)
        if value:
            server[key] = value
    return {"server": server} if server else {}


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None), overrides=_overrides(args))


def _add_config_flags(p: argparse.ArgumentParser, *, server: bool = False) -> None:
    p.add_argument("--config", help="YAML file merged over the embedded default "
                   "(env TRIVY_GATEWAY_CONFIG)")
    p.add_argument("--data-dir", dest="data_dir", help="CA, cache and state (server.data_dir)")
    if server:
        p.add_argument("--listen", help="proxy address HOST:PORT (server.listen, default 0.0.0.0:3128)")
        p.add_argument("--admin-listen", dest="admin_listen",
                       help="admin address HOST:PORT (server.admin_listen, default 0.0.0.0:9128)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trivy-gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"trivy-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the proxy and the admin endpoints")
    _add_config_flags(p, server=True)

    p = sub.add_parser("reload", help="validate the configuration, then make the gateway on "
                       "this data dir re-read it (SIGHUP) and report what it applied")
    _add_config_flags(p)

    p = sub.add_parser("check-config", help="validate the configuration and exit")
    _add_config_flags(p)
    p.add_argument("--print", action="store_true", help="print the effective settings as JSON")

    ca = sub.add_parser("ca", help="the gateway's certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    p = ca_sub.add_parser("init", help="create the CA in the data dir if there is none "
                          "(what the first `serve` does); prints its fingerprint")
    _add_config_flags(p)
    for name, text in (("export", "print the CA certificate (PEM)"),
                       ("bundle", "print system roots + the gateway CA, for SSL_CERT_FILE")):
        p = ca_sub.add_parser(name, help=text)
        _add_config_flags(p)
        p.add_argument("--from", dest="from_url", metavar="URL",
                       help="fetch the CA from a running gateway's admin port "
                            "(e.g. http://gateway:9128; reads URL/ca.pem) instead of the data dir")

    p = sub.add_parser("healthcheck", help="exit 0 when the local gateway answers on its admin "
                       "port (reads the same configuration; for container HEALTHCHECKs)")
    _add_config_flags(p)
    p.add_argument("--ready", action="store_true", help="ask /readyz instead of /healthz")

    cache = sub.add_parser("cache", help="inspect and maintain the cache (gateway may be running)")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    p = cache_sub.add_parser("stats", help="sizes and counts")
    _add_config_flags(p)
    p = cache_sub.add_parser("ls", help="list cached responses")
    _add_config_flags(p)
    p.add_argument("--keys", action="store_true", help="print raw cache keys (for scripts)")
    p = cache_sub.add_parser("purge", help="remove entries (by host/repository/age, or --all)")
    _add_config_flags(p)
    p.add_argument("--all", dest="purge_all", action="store_true",
                   help="remove every entry (required when no filter is given)")
    p.add_argument("--host", help="only entries fetched from this host")
    p.add_argument("--repo", help="only OCI entries of this repository (e.g. aquasec/trivy-db)")
    p.add_argument("--older-than", dest="older_than", help="only entries validated longer ago (e.g. 7d)")
    p = cache_sub.add_parser("verify", help="re-hash every blob; drop the ones that do not match")
    _add_config_flags(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "serve")  # `python -m gateway [--listen …]` runs the gateway
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"trivy-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    from .observability.logging import configure_logging  # noqa: PLC0415

    # logs go to stderr, so `ca export > ca.pem` and `cache stats | jq` stay clean
    configure_logging(settings.logging)
    try:
        if args.command == "serve":
            return _serve(settings, lambda: _settings(args))
        if args.command == "reload":
            return _reload(settings)
        if args.command == "check-config":
            return _check_config(settings, args)
        if args.command == "ca":
            return _ca(settings, args)
        if args.command == "healthcheck":
            return _healthcheck(settings, args)
        if args.command == "cache":
            return _cache(settings, args)
    except ConfigError as exc:
        print(f"trivy-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except StateMissing as exc:
        print(f"trivy-gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.print_help()
    return 2


def _serve(settings: Settings, loader) -> int:
    from .app import Gateway  # noqa: PLC0415 - keep `ca export` and friends light
    from .startup import StartupError  # noqa: PLC0415

    loop_factory = None
    if settings.server.event_loop == "uvloop":
        try:
            import uvloop  # noqa: PLC0415 - optional extra
        except ImportError:
            print("trivy-gateway: server.event_loop is uvloop but uvloop is not installed "
                  "(pip install 'trivy-gateway[uvloop]')", file=sys.stderr)
            return 2
        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(Gateway(settings, loader).run_forever())
    except (OSError, StartupError) as exc:
        print(f"trivy-gateway: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_config(settings: Settings, args: argparse.Namespace) -> int:
    if args.print:
        print(json.dumps(settings_view(settings), indent=2, default=str))
    print(f"configuration OK ({settings.source}, digest {settings_digest(settings)}): "
          f"{len(settings.policy.rules)} policy rules, "
          f"listen {settings.server.listen}, admin {settings.server.admin_listen}, "
          f"data dir {settings.server.data_dir}", file=sys.stderr)
    return 0


def _data_dir_hint(settings: Settings) -> str:
    return (f"server.data_dir is {settings.server.data_dir!r} (from "
            f"{settings.origin('server.data_dir')}, cwd {Path.cwd()}); pass the gateway's "
            "--config or --data-dir")


def _ca(settings: Settings, args: argparse.Namespace) -> int:
    from .tls.ca import CertificateAuthority, bundle_from_pem  # noqa: PLC0415

    if args.ca_command == "init":   # the one ca command that may create state, by its name
        try:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            ca = CertificateAuthority.load_or_create(settings)
        except OSError as exc:
            raise StateMissing(f"cannot create the CA: {exc.strerror}: {exc.filename} "
                               f"({_data_dir_hint(settings)})") from None
        print(f"gateway CA {ca.cert_path} sha256={ca.fingerprint_sha256}", file=sys.stderr)
        return 0
    pem = _fetch_ca(args.from_url) if args.from_url else _read_ca(settings)
    sys.stdout.write(pem.decode("ascii") if args.ca_command == "export" else bundle_from_pem(pem))
    return 0


def _read_ca(settings: Settings) -> bytes:
    """The CA certificate(s) the gateway uses, read without the key and never created."""
    if settings.tls.ca_cert:
        path, origin = Path(settings.tls.ca_cert), f"tls.ca_cert from {settings.origin('tls.ca_cert')}"
    else:
        from .tls.ca import CA_CERT_FILE, CA_DIR  # noqa: PLC0415

        path, origin = settings.data_dir / CA_DIR / CA_CERT_FILE, _data_dir_hint(settings)
    try:
        return _checked_pem(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise StateMissing(f"no gateway CA at {path}: {origin}. The CA is created by "
                           "`trivy-gateway serve`; on a scanner host use "
                           "`trivy-gateway ca bundle --from http://GATEWAY:9128`") from None
    except OSError as exc:
        raise StateMissing(f"cannot read the gateway CA {path}: {exc.strerror}") from None


def _fetch_ca(url: str) -> bytes:
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
    return _checked_pem(body, target)


def _checked_pem(data: bytes, where: str) -> bytes:
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


def _admin_status(settings: Settings) -> Optional[dict]:
    """/api/status of the local gateway (with the admin token when one is configured)."""
    import urllib.request  # noqa: PLC0415

    host, port = settings.server.admin_addr
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    host = f"[{host}]" if ":" in host else host
    headers = ({"Authorization": f"Bearer {settings.server.admin_token}"}
               if settings.server.admin_token else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(f"http://{host}:{port}/api/status",
                                                headers=headers), timeout=4) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _reload(settings: Settings) -> int:
    """Signal the gateway holding this data dir's lock, then wait (bounded) for its report."""
    import fcntl  # noqa: PLC0415
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from .startup import LOCK_FILE  # noqa: PLC0415

    lock = settings.data_dir / LOCK_FILE
    try:
        with open(lock, encoding="ascii") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                running = False                 # nobody holds it: no gateway
            except BlockingIOError:
                running = True
            pid = int(handle.read().strip() or 0)
    except (OSError, ValueError):
        running, pid = False, 0
    if not running or pid <= 0:
        raise StateMissing(f"no gateway is running on {lock.parent}: {_data_dir_hint(settings)}")
    before = (_admin_status(settings) or {}).get("config", {}).get("last_reload")
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        config = (_admin_status(settings) or {}).get("config") or {}
        report = config.get("last_reload")
        if report and report != before:
            if report.get("result") != "applied":
                print("trivy-gateway: the gateway refused the new configuration (the running "
                      "one stays):\n  " + "\n  ".join(report.get("errors") or []), file=sys.stderr)
                return 2
            print(f"reloaded: config {config.get('digest')}; applied: "
                  f"{', '.join(report.get('applied') or []) or 'nothing changed'}", file=sys.stderr)
            if report.get("restart_needed"):
                print("needs a restart to take effect: " + ", ".join(report["restart_needed"]),
                      file=sys.stderr)
            return 0
        time.sleep(0.1)
    print(f"trivy-gateway: sent SIGHUP to pid {pid}; no report on its admin port within 10s "
          "(see its log: config_reloaded / config_reload_refused)", file=sys.stderr)
    return 1


def _healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    """GET the admin port's /healthz (or /readyz) on this host, from the effective config, so a
    YAML that moves the admin port does not break the container's HEALTHCHECK."""
    import urllib.request  # noqa: PLC0415

    host, port = settings.server.admin_addr
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}/{'readyz' if args.ready else 'healthz'}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via *_proxy
    try:
        with opener.open(url, timeout=4) as response:
            response.read(1024)
    except OSError as exc:
        print(f"trivy-gateway: {url}: {getattr(exc, 'reason', None) or exc}", file=sys.stderr)
        return 1
    return 0


def _cache(settings: Settings, args: argparse.Namespace) -> int:
    root = settings.data_dir / "cache"
    if not root.is_dir():
        raise StateMissing(f"no gateway cache at {root}: {_data_dir_hint(settings)}")
    if args.cache_command == "purge" and not (args.host or args.repo or args.older_than
                                              or args.purge_all):
        print("trivy-gateway: cache purge needs a filter (--host, --repo, --older-than) or "
              "--all to remove every entry", file=sys.stderr)
        return 2
    from .cache.admin import run_cache_command  # noqa: PLC0415 - only for this command

    return run_cache_command(settings, args)


def parse_age(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    return time.time() - parse_duration(value, "--older-than")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
