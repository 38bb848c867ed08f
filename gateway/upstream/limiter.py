"""Per-host smoothing: token bucket (rate, burst) + concurrency cap + bounded FIFO queue + AIMD.

A request takes one token and one concurrency slot before it is sent and gives the slot back
when its response body has been consumed or released (the connection is busy until then). When
neither is available it waits in a FIFO queue of bounded size; a waiter that is not served within
its timeout leaves the queue. A 429 multiplies the host's rate by ``backoff_factor`` (and drops the
saved-up burst), and the rate then recovers by ``recovery_per_second`` per second up to the
configured rate.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable, Optional

from ..settings import HostLimitSettings


class LimiterFull(Exception):
    """The host's queue is full."""


class LimiterTimeout(Exception):
    """Not served within the timeout."""


class HostLimiter:
    def __init__(self, host: str, cfg: HostLimitSettings, *,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Optional[Callable[["HostLimiter"], None]] = None) -> None:
        self.host = host
        self.cfg = cfg
        self._clock = clock
        self._on_change = on_change
        self.rate = float(cfg.rate)
        #: lowest rate AIMD may reach (one request a minute, or the configured rate if lower)
        self.min_rate = min(float(cfg.rate), 1 / 60)
        self.tokens = float(cfg.burst)
        self._last = clock()
        self.in_flight = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._timer: Optional[asyncio.TimerHandle] = None
        self.granted = 0
        self.rejected_full = 0
        self.timed_out = 0

    # -- state ------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        if self.rate < self.cfg.rate:
            self.rate = min(float(self.cfg.rate), self.rate + self.cfg.recovery_per_second * elapsed)
        self.tokens = min(float(self.cfg.burst), self.tokens + elapsed * self.rate)

    def _changed(self) -> None:
        if self._on_change:
            self._on_change(self)

    # -- acquire / release ------------------------------------------------------------------
    def _try_take(self) -> bool:
        if self.in_flight >= self.cfg.max_concurrency:
            return False
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        self.in_flight += 1
        self.granted += 1
        return True

    async def acquire(self, timeout: float) -> float:
        """Wait for a token and a slot; return the seconds waited.

        Raises :class:`LimiterFull` when the queue is full, :class:`LimiterTimeout` after
        ``timeout`` seconds.
        """
        started = self._clock()
        if not self._waiters and self._try_take():
            self._changed()
            return 0.0
        if self.queue_depth >= self.cfg.queue_size:
            self.rejected_full += 1
            raise LimiterFull()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._changed()
        self._pump()
        try:
            if not fut.done():
                await asyncio.wait([fut], timeout=max(0.0, timeout))
        except asyncio.CancelledError:
            self._abandon(fut)
            raise
        if not fut.done():
            self._abandon(fut)
            self.timed_out += 1
            raise LimiterTimeout()
        self._changed()
        return self._clock() - started

    def _abandon(self, fut: asyncio.Future) -> None:
        if fut.done() and not fut.cancelled():
            # granted while we were giving up: hand the slot back
            self.release()
        else:
            fut.cancel()
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass
        self._changed()
        self._pump()

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self._changed()
        self._pump()

    def _pump(self) -> None:
        """Grant waiting requests in FIFO order while tokens and slots allow."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters:
            head = self._waiters[0]
            if head.done():
                self._waiters.popleft()
                continue
            if self.in_flight >= self.cfg.max_concurrency:
                return  # a release() will pump again
            if not self._try_take():
                # out of tokens: come back when the next one has accrued
                wait = (1 - self.tokens) / max(self.rate, 1e-6)
                self._timer = asyncio.get_running_loop().call_later(max(wait, 0.001), self._pump)
                return
            self._waiters.popleft()
            head.set_result(None)
        self._changed()

    # -- AIMD -------------------------------------------------------------------------------
    def on_throttled(self) -> None:
        """The host answered 429: cut the rate and forget the saved-up burst."""
        self._refill()
        self.rate = max(self.min_rate, self.rate * self.cfg.backoff_factor)
        self.tokens = min(self.tokens, 1.0)
        self._changed()

    def current_rate(self) -> float:
        self._refill()
        return self.rate
