"""Command line: ``trivy-gateway serve | check-config | reload | healthcheck | ca … | cache … |
bundle export|import``.

Every command that needs configuration loads it the same way (embedded default → ``--config`` →
env → flags) and reports a bad file with the key and the file name, exit code 2.

Only ``serve`` (and ``ca init``) create state; the commands on state are in
:mod:`gateway.cli_state`, those that talk to a running gateway in :mod:`gateway.cli_running`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Callable, Optional, Sequence

from . import __version__
from .cli_state import StateMissing, cache_command, ca_command
from .cli_running import healthcheck_command, reload_command
from .settings import (ConfigError, Settings, load_settings, settings_digest,
                       settings_view)


def _overrides(args: argparse.Namespace) -> dict:
    server = {}
    for flag, key in (("listen", "listen"), ("admin_listen", "admin_listen"),
                      ("mirror_listen", "mirror_listen"), ("data_dir", "data_dir")):
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
        p.add_argument("--mirror-listen", dest="mirror_listen",
                       help="mirror door address HOST:PORT (server.mirror_listen, default off; "
                            "docs/without-a-ca.md)")


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
    p.add_argument("--host", help="only entries requested from or served by this host (exact)")
    p.add_argument("--repo", help="only OCI entries of exactly this repository: aquasec/trivy-db "
                                  "(any registry) or mirror.gcr.io/aquasec/trivy-db")
    p.add_argument("--older-than", dest="older_than", help="only entries validated longer ago (e.g. 7d)")
    p = cache_sub.add_parser("verify", help="re-hash every blob; drop the ones that do not match")
    _add_config_flags(p)
    from .lifecycle.commands import add_bundle_parser  # noqa: PLC0415 - argparse only

    add_bundle_parser(sub, _add_config_flags)
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
            _check_files(settings)
            return reload_command(settings)
        if args.command == "check-config":
            return _check_config(settings, args)
        if args.command == "ca":
            return ca_command(settings, args)
        if args.command == "healthcheck":
            return healthcheck_command(settings, args)
        if args.command in ("cache", "bundle"):
            _migrate_cache_keys(settings)
        if args.command == "cache":
            return cache_command(settings, args)
        if args.command == "bundle":
            return _bundle(settings, args)
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


def _serve(settings: Settings, loader: Callable[[], Settings]) -> int:
    """Run the gateway; ``loader`` re-reads the configuration for a live reload."""
    if settings.server.worker_count > 1:
        from .workers import run_workers  # noqa: PLC0415

        return run_workers(settings, loader, _serve)
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


def _migrate_cache_keys(settings: Settings) -> None:
    """Entries of an older key format are converted before a cache or bundle command reads
    them (``startup.migrate_cache_keys``); what happened goes to stderr."""
    from .startup import migrate_cache_keys  # noqa: PLC0415

    line = migrate_cache_keys(settings)
    if line:
        print(f"trivy-gateway: {line}", file=sys.stderr)


def _bundle(settings: Settings, args: argparse.Namespace) -> int:
    """``bundle export`` reads every tier of the data dir; ``bundle import`` with
    ``server.workers: N`` imports into every worker's tier: a worker serves only its own, so a
    bundle imported into ``<data_dir>/cache`` would be served by none (disk: N copies, each
    within the worker's ``cache.max_size / N``)."""
    from .lifecycle.commands import run_bundle_command  # noqa: PLC0415

    n = settings.server.worker_count
    if args.bundle_command != "import" or n < 2:
        return run_bundle_command(settings, args)
    from .workers import worker_settings  # noqa: PLC0415

    for i in range(n):
        tier = worker_settings(settings, i, n)
        print(f"worker {i} of {n}: importing into {tier.data_dir}", file=sys.stderr)
        rc = run_bundle_command(tier, args)
        if rc:
            return rc
    return 0


def _check_files(settings: Settings) -> None:
    """What ``serve`` would fail on among the files the configuration names, as far as this
    process can tell: a relative path is the serving process's business (its own cwd)."""
    from .startup import check_files  # noqa: PLC0415

    check_files(settings, absolute_only=True)


def _check_config(settings: Settings, args: argparse.Namespace) -> int:
    _check_files(settings)
    if args.print:
        print(json.dumps(settings_view(settings), indent=2, default=str))
    print(f"configuration OK ({settings.source}, digest {settings_digest(settings)}): "
          f"{len(settings.policy.rules)} policy rules, "
          f"listen {settings.server.listen}, admin {settings.server.admin_listen}, "
          f"mirror {settings.server.mirror_listen or 'off'}, "
          f"data dir {settings.server.data_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
