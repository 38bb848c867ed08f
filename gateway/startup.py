"""Start-up checks that run before the gateway creates anything.

Why a separate step: a gateway that fails to bind its port must not leave a fresh CA, an empty
cache or an open upstream session behind, and every failure must name the setting to change and
where that setting came from (``server.listen (flag --listen)``), not a bare ``[Errno 98]``.

The data dir lock (``<data_dir>/gateway.lock``, ``flock``) keeps two gateways off one data dir:
they would evict each other's blobs and race on the CA. The kernel drops the lock when the
process dies, so a crash never leaves a stale lock behind.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import IO, Optional

from .settings import Settings, split_hostport

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
    ``server.reuse_port``), like this probe."""
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
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if settings.server.reuse_port and key != "server.admin_listen":
                # a worker (gateway.workers) shares the proxy and mirror ports with the others
                # (SO_REUSEPORT); a foreign listener without it still makes the probe fail
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(addr)
            except OSError as exc:
                hint = (" (another process listens there)" if exc.errno == errno.EADDRINUSE
                        else "")
                raise StartupError(f"cannot listen on {_describe(settings, key)}: "
                                   f"{exc.strerror}{hint}") from None


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
