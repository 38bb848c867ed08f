"""Per-host circuit breaker.

closed ──(failure_threshold consecutive failed requests | long Retry-After | rate limit)──▶ open
open ──(window over)──▶ half_open: exactly one probe request at a time
half_open ──probe succeeds──▶ closed;  ──probe fails──▶ open again (open_for)

While open, nothing is sent to the host: :meth:`CircuitBreaker.admit` raises
:class:`CircuitOpen` carrying the remaining window, why it opened and the status a client should
get (429 when a 429 or an exhausted rate limit opened it, else 503).
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable, Optional

from ..settings import CircuitSettings

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"


class CircuitOpen(Exception):
    def __init__(self, host: str, remaining: float, status: int, why: str, until_wall: float,
                 probing: bool = False) -> None:
        self.host = host
        self.remaining = remaining
        self.status = status
        self.why = why
        self.until_wall = until_wall
        self.probing = probing
        until = datetime.fromtimestamp(until_wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if probing:
            msg = (f"circuit for {host} is half-open ({why}); one probe request is in flight, "
                   f"others are held back")
        else:
            msg = (f"circuit for {host} is open ({why}); no request is sent to {host} until "
                   f"{until} ({remaining:.0f}s from now)")
        super().__init__(msg)
        self.message = msg


class CircuitBreaker:
    def __init__(self, host: str, cfg: CircuitSettings, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 on_change: Optional[Callable[["CircuitBreaker", str, str], None]] = None) -> None:
        self.host = host
        self.cfg = cfg
        self._clock = clock
        self._wall = wall
        self._on_change = on_change
        self.state = CLOSED
        self.failures = 0
        self.open_until = 0.0
        self.open_status = 503
        self.why = ""
        self.probe_in_flight = False
        self.opened_count = 0
        self.last_failure_status: Optional[int] = None

    # -- queries ----------------------------------------------------------------------------
    def remaining(self) -> Optional[float]:
        """Seconds until the open window ends; None when the circuit is not open."""
        if self.state != OPEN:
            return None
        left = self.open_until - self._clock()
        return left if left > 0 else None

    def _set(self, state: str) -> None:
        old, self.state = self.state, state
        if old != state and self._on_change:
            self._on_change(self, old, state)

    # -- admission ----------------------------------------------------------------------------
    def admit(self) -> bool:
        """Allow a request or raise :class:`CircuitOpen`; True means "you are the probe"."""
        if self.state == CLOSED:
            return False
        now = self._clock()
        if self.state == OPEN:
            if now < self.open_until:
                left = self.open_until - now
                raise CircuitOpen(self.host, left, self.open_status, self.why,
                                  self._wall() + left)
            self._set(HALF_OPEN)
            self.probe_in_flight = False
        # half-open
        if self.probe_in_flight:
            raise CircuitOpen(self.host, 1.0, self.open_status, self.why, self._wall() + 1.0,
                              probing=True)
        self.probe_in_flight = True
        return True

    def probe_abandoned(self) -> None:
        """The probe never reached the host (queue timeout, cancelled): let another try."""
        self.probe_in_flight = False

    # -- outcomes -----------------------------------------------------------------------------
    def success(self, probe: bool = False) -> None:
        if self.state == OPEN:
            return  # a straggler from before the circuit opened
        if self.state == HALF_OPEN and not probe:
            return
        self.failures = 0
        self.probe_in_flight = False
        self.last_failure_status = None
        self._set(CLOSED)

    def failure(self, status: Optional[int], what: str, probe: bool = False) -> None:
        """One failed request (after its retries), or a failed probe."""
        if self.state == OPEN:
            return
        self.last_failure_status = status
        if self.state == HALF_OPEN:
            if not probe:
                return
            self.probe_in_flight = False
            self._open(self.cfg.open_for, 429 if status == 429 else 503,
                       f"half-open probe failed: {what}")
            return
        self.failures += 1
        if self.failures >= self.cfg.failure_threshold:
            self._open(self.cfg.open_for, 429 if status == 429 else 503,
                       f"{self.failures} consecutive failed requests (each after its retries), "
                       f"last: {what}")

    def open_for_retry_after(self, seconds: float, status: int) -> float:
        """Open for a long Retry-After window (capped by max_open_for); return the window."""
        window = min(seconds, self.cfg.max_open_for)
        self.probe_in_flight = False
        self._open(window, 429 if status == 429 else 503,
                   f"{status} with Retry-After {seconds:.0f}s")
        return window

    def open_for_rate_limit(self, seconds: float, status: int, why: str) -> float:
        """Open until an exhausted rate limit resets (GitHub's 403/429 with
        ``X-RateLimit-Remaining: 0``), capped by max_open_for; clients get 429. Return the window."""
        window = min(seconds, self.cfg.max_open_for)
        self.probe_in_flight = False
        self._open(window, 429, f"{status} {why}")
        return window

    def open_shared(self, window: float, status: int, why: str) -> None:
        """Open because another replica's breaker for this host opened (gateway/shared/):
        for the window left there, with its status and reason."""
        if window <= 0 or (self.state == OPEN and self.open_until >= self._clock() + window):
            return
        self.probe_in_flight = False
        self._open(window, status, why)

    def _open(self, window: float, status: int, why: str) -> None:
        now = self._clock()
        # never shorten an open window already in force
        self.open_until = max(now + window, self.open_until if self.state == OPEN else 0.0)
        self.open_status = status
        self.why = why
        self.opened_count += 1
        self.failures = 0
        self._set(OPEN)

    def snapshot(self) -> dict:
        left = self.remaining()
        return {
            "state": self.state if not (self.state == OPEN and left is None) else HALF_OPEN,
            "remaining_seconds": round(left, 3) if left is not None else None,
            "open_until": (datetime.fromtimestamp(self._wall() + left, timezone.utc).isoformat()
                           if left is not None else None),
            "why": self.why or None,
            "consecutive_failures": self.failures,
            "opened_count": self.opened_count,
        }
