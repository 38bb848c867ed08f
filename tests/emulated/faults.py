"""Fault knobs: thread-safe, each bounded by a count (or until cleared).

A fault matches by emulated host, optional path regex (``re.search`` on the
path, query excluded) and optional method.  Request-phase faults replace the
response (``status``, ``hang``, ``drop``, ``delay``); body-phase faults alter
how a 200/206 body is sent (``cut``, ``corrupt``, ``throttle``).
"""

from __future__ import annotations

import itertools
import re
import threading
from dataclasses import dataclass, field
from typing import Any

REQUEST_KINDS = frozenset({"status", "hang", "drop", "delay"})
BODY_KINDS = frozenset({"cut", "corrupt", "throttle"})
ALL_KINDS = REQUEST_KINDS | BODY_KINDS

_ids = itertools.count(1)


@dataclass
class Fault:
    host: str
    kind: str
    path: str | None = None  # regex, re.search against the request path
    method: str | None = None
    remaining: int | None = 1  # None = until cleared
    params: dict[str, Any] = field(default_factory=dict)
    id: int = field(default_factory=lambda: next(_ids))
    hits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ALL_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.remaining is not None and self.remaining < 0:
            raise ValueError("remaining must be >= 0 or None")
        self._rx = re.compile(self.path) if self.path else None

    def matches(self, host: str, method: str, path: str) -> bool:
        if self.host != host:
            return False
        if self.method and self.method.upper() != method.upper():
            return False
        if self._rx is not None and not self._rx.search(path):
            return False
        return self.remaining is None or self.remaining > 0

    @property
    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0


class FaultBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault | int) -> None:
        fid = fault if isinstance(fault, int) else fault.id
        with self._lock:
            self._faults = [f for f in self._faults if f.id != fid]

    def clear(self, host: str | None = None, kind: str | None = None) -> None:
        with self._lock:
            self._faults = [
                f
                for f in self._faults
                if not ((host is None or f.host == host) and (kind is None or f.kind == kind))
            ]

    def active(self) -> list[Fault]:
        with self._lock:
            return [f for f in self._faults if not f.exhausted]

    def _take(self, host: str, method: str, path: str, kinds: frozenset[str]) -> list[Fault]:
        """Consume the first matching fault of each kind in *kinds*."""
        taken: dict[str, Fault] = {}
        with self._lock:
            for f in self._faults:
                if f.kind in kinds and f.kind not in taken and f.matches(host, method, path):
                    taken[f.kind] = f
            for f in taken.values():
                f.hits += 1
                if f.remaining is not None:
                    f.remaining -= 1
        return list(taken.values())

    def take_request_fault(self, host: str, method: str, path: str) -> Fault | None:
        """First matching request-phase fault (consumed), in insertion order."""
        with self._lock:
            for f in self._faults:
                if f.kind in REQUEST_KINDS and f.matches(host, method, path):
                    f.hits += 1
                    if f.remaining is not None:
                        f.remaining -= 1
                    return f
        return None

    def take_body_faults(self, host: str, method: str, path: str) -> dict[str, Fault]:
        return {f.kind: f for f in self._take(host, method, path, BODY_KINDS)}
