"""Up/down bookkeeping for a shared backend (Redis, S3): serving never depends on one.

A failed call marks the backend down: one ``shared_backend_unavailable`` log line (backend,
operation, error, effect), ``trivy_gateway_shared_backend_up{backend}`` = 0, and calls are
skipped (the caller's local default is used) for :data:`RETRY_INTERVAL` seconds; the next call
that succeeds logs ``shared_backend_recovered`` and sets the gauge back to 1.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Optional, TypeVar

from ..observability.logging import get_logger
from ..observability.metrics import Metrics

log = get_logger("gateway.shared")

RETRY_INTERVAL = 1.0
T = TypeVar("T")


class Availability:
    def __init__(self, backend: str, where: str, metrics: Metrics, effect: str,
                 errors: tuple[type[BaseException], ...],
                 on_recovered: Optional[Callable[[], None]] = None) -> None:
        self.backend = backend
        self.where = where
        self.metrics = metrics
        self.effect = effect
        self.errors = errors + (OSError, asyncio.TimeoutError)
        self.on_recovered = on_recovered
        self.up = True
        self._retry_at = 0.0
        metrics.shared_backend_up.labels(backend=backend).set(1)

    async def guard(self, what: str, call: Callable[[], Awaitable[T]], default: T) -> T:
        """``await call()``, or ``default`` when the backend fails or is known to be down."""
        if not self.up and time.monotonic() < self._retry_at:
            return default
        try:
            result = await call()
        except self.errors as exc:
            self.down(what, exc)
            return default
        self.recovered()
        return result

    def down(self, what: str, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        if self.up:
            self.up = False
            self.metrics.shared_backend_up.labels(backend=self.backend).set(0)
            log.error("shared_backend_unavailable", backend=self.backend, where=self.where,
                      operation=what, error=f"{type(exc).__name__}: {exc}", effect=self.effect)

    def recovered(self) -> None:
        if not self.up:
            self.up = True
            self.metrics.shared_backend_up.labels(backend=self.backend).set(1)
            log.warning("shared_backend_recovered", backend=self.backend, where=self.where)
            if self.on_recovered is not None:
                self.on_recovered()
