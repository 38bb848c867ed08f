"""Thread-safe in-memory access log (optionally mirrored to a JSONL file)."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable


@dataclass
class LogEntry:
    """One request as the emulated server saw it.

    The entry is appended when the request head has been read (``done`` is
    False, ``status`` None) and completed in place when the response has been
    sent, aborted, or the hang ended.
    """

    seq: int
    host: str  # emulated host whose listener received the request
    method: str
    path: str
    query: str  # raw query string, without '?'
    request_headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    conn_id: int  # TLS connection number (same number = keep-alive reuse)
    sni: str | None
    t_start: float  # time.monotonic()
    t_end: float | None = None
    status: int | None = None
    bytes_sent: int = 0  # body bytes actually written
    content_length: int | None = None  # announced Content-Length
    response_headers: dict[str, str] = field(default_factory=dict)
    note: str = ""  # e.g. "fault:status", "cut@1048576", "corrupt@10", "hang", "aborted"
    done: bool = False

    @property
    def url(self) -> str:
        return f"https://{self.host}{self.path}" + (f"?{self.query}" if self.query else "")

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.request_headers.get(name.lower(), default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AccessLog:
    def __init__(self, jsonl_path: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        self._entries: list[LogEntry] = []
        self._seq = 0
        self._jsonl_path = Path(jsonl_path) if jsonl_path else None

    # -- writing (server side) -------------------------------------------------
    def start(self, **kw: Any) -> LogEntry:
        with self._lock:
            self._seq += 1
            e = LogEntry(seq=self._seq, t_start=time.monotonic(), **kw)
            self._entries.append(e)
            return e

    def finish(self, e: LogEntry, *, status: int | None = None, note: str | None = None) -> None:
        with self._lock:
            if e.done:
                return
            if status is not None:
                e.status = status
            if note:
                e.note = (e.note + " " + note).strip() if e.note else note
            e.t_end = time.monotonic()
            e.done = True
            path = self._jsonl_path
            line = json.dumps(e.to_dict(), sort_keys=True) if path else None
        if path and line:
            with self._lock:
                with path.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")

    def set_jsonl_path(self, path: str | Path | None) -> None:
        with self._lock:
            self._jsonl_path = Path(path) if path else None

    # -- queries ---------------------------------------------------------------
    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def entries(self) -> list[LogEntry]:
        with self._lock:
            return list(self._entries)

    def query(
        self,
        host: str | None = None,
        method: str | None = None,
        path_contains: str | None = None,
        path_regex: str | None = None,
        status: int | None = None,
        done: bool | None = None,
    ) -> list[LogEntry]:
        rx = re.compile(path_regex) if path_regex else None
        out: list[LogEntry] = []
        for e in self.entries():
            if host is not None and e.host != host:
                continue
            if method is not None and e.method != method.upper():
                continue
            if path_contains is not None and path_contains not in e.path:
                continue
            if rx is not None and not rx.search(e.path):
                continue
            if status is not None and e.status != status:
                continue
            if done is not None and e.done != done:
                continue
            out.append(e)
        return out

    def summary(self, entries: Iterable[LogEntry] | None = None) -> str:
        """Human-readable table, handy in assertion messages."""
        rows = []
        for e in entries if entries is not None else self.entries():
            rows.append(
                f"#{e.seq} c{e.conn_id} {e.method} {e.url} -> {e.status} "
                f"{e.bytes_sent}B {e.note}".rstrip()
            )
        return "\n".join(rows)
