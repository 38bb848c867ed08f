"""Start-up checks that run before the gateway creates anything.

Why a separate step: a gateway that fails to bind its port must not leave a fresh CA, an empty
cache or an open upstream session behind, and every failure must name the setting to change and
where that setting came from (``server.listen (flag --listen)``), not a bare ``[Errno 98]``.

Files the configuration names (the mirror door's certificate and key, ``upstream.ca_bundle``,
the operator's CA) are opened and parsed here too, before the data dir is taken, so a typo in a
path is ``mirror.tls.cert in /etc/gw.yaml line 12: cannot read /etc/gw/tls.crt: No such file or
directory`` (exit 2, like any configuration error) and not a bare ``[Errno 2]`` after the gateway
has already created its CA and cache. Secret files are read by the settings loader itself.

The data dir lock (``<data_dir>/gateway.lock``, ``flock``) keeps two gateways off one data dir:
they would evict each other's blobs and race on the CA. The kernel drops the lock when the
process dies, so a crash never leaves a stale lock behind.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import ssl
from pathlib import Path
from typing import IO, Iterator, Optional

from .settings import ConfigError, ConfigErrors, Settings, split_hostport

LOCK_FILE = "gateway.lock"


class StartupError(Exception):
    """The gateway cannot start; the message names the setting and its origin."""


def _describe(settings: Settings, key: str) -> str:
    section, name = key.split(".", 1)
    value = getattr(getattr(settings, section), name)
    return f"{key} {value!r} (from {settings.origin(key)})"


def check_addresses(settings: Settings) -> None:
    """Bind each listen address once and release it, so a taken port fails before any state
    exists. The real listeners bind moments later with SO_REUSEADDR (and SO_REUSEPORT when
    ``server.reuse_port``), like this probe — on *every* address the host resolves to, as
    ``loop.create_server`` does (an empty host: all IPv4 and all IPv6 addresses), IPv6 ones
    with IPV6_V6ONLY as asyncio sets it."""
    keys = ["server.listen", "server.admin_listen"]
    if settings.server.mirror_listen:
        keys.append("server.mirror_listen")
    for key in keys:
        host, port = split_hostport(getattr(settings.server, key.split(".")[1]), key)
        if port == 0:
            continue
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise StartupError(f"cannot resolve {_describe(settings, key)}: {exc.strerror}") from None
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if settings.server.reuse_port and key != "server.admin_listen":
                    # a worker (gateway.workers) shares the proxy and mirror ports with the
                    # others (SO_REUSEPORT); a foreign listener without it still fails the probe
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    probe.bind(addr)
                except OSError as exc:
                    hint = (" (another process listens there)" if exc.errno == errno.EADDRINUSE
                            else "")
                    where = f" on {addr[0]}" if len(infos) > 1 else ""
                    raise StartupError(f"cannot listen on {_describe(settings, key)}{where}: "
                                       f"{exc.strerror}{hint}") from None


def check_files(settings: Settings, *, absolute_only: bool = False) -> None:
    """Open and parse every file the gateway loads at start, without creating anything; raise
    :class:`ConfigErrors` naming each bad key, where it was set, the path and the OS (or
    OpenSSL) error. ``absolute_only`` (``check-config``): a relative path is resolved against
    the serving process's working directory, which need not be this one, so only absolute
    paths are checked."""
    errors = list(_file_problems(settings, absolute_only))
    if errors:
        raise ConfigErrors(errors)


def _file_problems(settings: Settings, absolute_only: bool) -> Iterator[ConfigError]:
    def wanted(*paths: Optional[str]) -> bool:
        return all(paths) and (not absolute_only or all(os.path.isabs(str(p)) for p in paths))

    cert, key = settings.mirror.tls.cert, settings.mirror.tls.key
    if settings.server.mirror_listen and cert and key and wanted(cert, key):
        problems = [e for e in (_unreadable(settings, "mirror.tls.cert", cert),
                                _unreadable(settings, "mirror.tls.key", key)) if e]
        yield from problems or _server_pair_problems(settings, cert, key)
    bundle = settings.upstream.ca_bundle
    if bundle and wanted(bundle):
        problem = (_unreadable(settings, "upstream.ca_bundle", bundle)
                   or _trust_problem(settings, "upstream.ca_bundle", bundle))
        if problem:
            yield problem
    tls = settings.tls
    if tls.ca_cert and tls.ca_key and wanted(tls.ca_cert, tls.ca_key):
        from .tls.ca import CAError, CertificateAuthority  # noqa: PLC0415 - cryptography is heavy

        try:
            CertificateAuthority.load(tls.ca_cert, tls.ca_key,
                                      password=tls.ca_key_password.encode() or None)
        except CAError as exc:
            yield settings.error(f"tls.ca_{exc.part}", str(exc))


def _unreadable(settings: Settings, key: str, path: str) -> Optional[ConfigError]:
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return settings.error(key, f"cannot read {path}: {exc.strerror}")


def _openssl_reason(exc: ssl.SSLError) -> str:
    """``[X509: KEY_VALUES_MISMATCH] key values mismatch``, without CPython's ``(_ssl.c:3926)``."""
    text = str(exc.args[1] if len(exc.args) > 1 else exc)
    return text.rsplit(" (_ssl.c:", 1)[0]


def _trust_problem(settings: Settings, key: str, path: str) -> Optional[ConfigError]:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        return settings.error(key, f"{path} holds no usable PEM certificate "
                                   f"(OpenSSL: {_openssl_reason(exc)})")
    return None


def _refuse_password() -> bytes:
    raise ValueError("encrypted")   # never let OpenSSL prompt on the terminal


def _server_pair_problems(settings: Settings, cert: str, key: str) -> Iterator[ConfigError]:
    """What the mirror listener's ``load_cert_chain`` would fail on, blamed on the right key."""
    problem = _trust_problem(settings, "mirror.tls.cert", cert)
    if problem:
        yield problem
        return
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key, password=_refuse_password)
    except ValueError:
        yield settings.error("mirror.tls.key", f"{key} is encrypted; the mirror listener needs "
                                               "an unencrypted key")
    except ssl.SSLError as exc:
        yield settings.error("mirror.tls.key", f"{key} does not load as the key of {cert} "
                                               f"(OpenSSL: {_openssl_reason(exc)})")


class DataDirLock:
    """Exclusive use of ``server.data_dir`` for this process's lifetime."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.data_dir / LOCK_FILE
        self._file: Optional[IO[str]] = None

    def acquire(self) -> None:
        where = _describe(self.settings, "server.data_dir")
        try:
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="ascii")
        except OSError as exc:
            raise StartupError(f"cannot use {where}: {exc.strerror}: {exc.filename}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StartupError(f"another gateway (pid {holder}) is using {where}; each gateway "
                               "needs its own data dir (or stop the other one first)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            handle.close()          # closing drops the flock


def data_dir_error(settings: Settings, exc: OSError) -> StartupError:
    """An OSError while creating state under the data dir, named after the setting."""
    path = Path(exc.filename) if exc.filename else settings.data_dir
    return StartupError(f"cannot write under {_describe(settings, 'server.data_dir')}: "
                        f"{exc.strerror}: {path}")


def ca_error(settings: Settings, exc: Exception) -> StartupError:
    """The CA kept under the data dir does not load (a lost key, a damaged file): exit 1 with
    the reason and the setting, not a traceback."""
    return StartupError(f"cannot use the CA under {_describe(settings, 'server.data_dir')}: {exc}")


def migrate_cache_keys(settings: Settings) -> Optional[str]:
    """For the operator commands (``cache …``, ``bundle …``): bring every local tier's entries
    to the current key format, as ``serve`` does at start, so a command run after an upgrade and
    before the first start sees (and exports) the entries under the keys the gateway looks up.

    Only while no gateway runs on the data dir (its lock is free): a running gateway of this
    version has migrated at its start, and one of an older version must not have its entries
    renamed under it. Returns a line for the operator (what was done, or why not), or None when
    there was nothing to do.
    """
    from .cache import BlobStore, EntryStore  # noqa: PLC0415 - keep light commands light
    from .cache.keyformat import migrate_keys, stored_format  # noqa: PLC0415
    from .cache.tiers import cache_tiers  # noqa: PLC0415
    from .observability.metrics import Metrics  # noqa: PLC0415
    from .resources.legacy import KEY_UPGRADE  # noqa: PLC0415

    pending = [t for t in cache_tiers(settings.data_dir)
               if (t.root / "entries").is_dir()
               and stored_format(t.root / "entries") < KEY_UPGRADE.format]
    if not pending:
        return None
    lock = DataDirLock(settings)
    try:
        lock.acquire()
    except StartupError:
        return (f"note: the cache under {settings.data_dir} has entries of an older key format and "
                "a gateway is running on it without having converted them (an older version?): "
                "they are not shown; upgrade and restart that gateway")
    try:
        done = []
        for tier in pending:
            metrics = Metrics()
            blobs = BlobStore(tier.root, settings.cache.max_size, 0, metrics)
            blobs.open(clean_tmp=False)          # tmp/ is a gateway's business, even a stopped one's
            report = migrate_keys(EntryStore(tier.root, blobs, settings.cache.memory, metrics),
                                  KEY_UPGRADE)
            if report is not None:
                done.append(f"{tier.name}: {report.migrated} kept, {report.dropped} dropped"
                            + (f", {report.failed} failed" if report.failed else ""))
    finally:
        lock.release()
    return ("converted the cache to the current key format, as `serve` does at its first start ("
            + "; ".join(done) + ")") if done else None
