"""Central upstream credentials: per exact host, Bearer or Basic, secrets re-read when rotated.

A credential is only ever put on a request whose host equals its ``host``; the client layer drops
it (with any Authorization) when a redirect leaves that host. Values never reach a log line: this
module only hands out header values, and ``repr`` of the settings masks them.
"""
from __future__ import annotations

import base64
import os
import time
from typing import Iterable, Optional

from ..settings import CredentialSettings


class _Entry:
    def __init__(self, cfg: CredentialSettings) -> None:
        self.cfg = cfg
        self.secret = cfg.secret
        self._stat: Optional[tuple[float, int]] = None
        self._checked = 0.0
        if cfg.secret_file:
            self._stat = self._file_stat()

    def _file_stat(self) -> Optional[tuple[float, int]]:
        try:
            st = os.stat(self.cfg.secret_file)  # type: ignore[arg-type]
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current_secret(self) -> str:
        if self.cfg.secret_file:
            now = time.monotonic()
            if now - self._checked >= 1.0 or not self.secret:
                self._checked = now
                stat = self._file_stat()
                if stat is not None and (stat != self._stat or not self.secret):
                    try:
                        with open(self.cfg.secret_file, encoding="utf-8") as f:
                            value = f.read().strip()
                    except OSError:
                        value = ""
                    if value:
                        self.secret = value
                        self._stat = stat
        return self.secret

    def header(self) -> Optional[str]:
        secret = self.current_secret()
        if not secret:
            return None
        if self.cfg.type == "basic":
            raw = f"{self.cfg.username}:{secret}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        return "Bearer " + secret


class CredentialStore:
    def __init__(self, creds: Iterable[CredentialSettings]) -> None:
        self._by_host = {c.host.lower(): _Entry(c) for c in creds}

    def authorization(self, host: str) -> Optional[str]:
        """The Authorization value to inject for ``host`` (exact match), if one is configured."""
        entry = self._by_host.get(host.lower().rstrip("."))
        return entry.header() if entry else None

    def basic_for(self, host: str) -> Optional[str]:
        """A Basic Authorization value for ``host`` (token endpoints want Basic, not Bearer)."""
        entry = self._by_host.get(host.lower().rstrip("."))
        if entry is None:
            return None
        secret = entry.current_secret()
        if not secret:
            return None
        user = entry.cfg.username or ("token" if entry.cfg.type == "bearer" else "")
        return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode("ascii")

    def hosts(self) -> list[str]:
        return sorted(self._by_host)
