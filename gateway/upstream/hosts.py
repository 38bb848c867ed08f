"""Per-host upstream state (limiter, circuit breaker, counters) and the bounded table holding it.

Hosts named in the configuration keep their state for the process's lifetime. Hosts reached
through a wildcard rule (``*.suffix``) could be unbounded in number, so their state is forgotten,
least recently used first, once it holds nothing worth keeping (idle limiter, quiet circuit) and
more than :data:`MAX_TRACKED_HOSTS` hosts are known; in /api/status they share one ``other``
entry, as they share the ``other`` metric label.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

from ..observability.logging import get_logger
from ..observability.metrics import CIRCUIT_STATES, Metrics
from ..settings import UpstreamSettings
from .circuit import CLOSED, CircuitBreaker
from .limiter import HostLimiter

log = get_logger("gateway.upstream")

#: hosts remembered before idle unconfigured ones are forgotten
MAX_TRACKED_HOSTS = 256
#: the /api/status entry that stands for every host not named in the configuration
OTHER = "other"
#: told of every circuit transition: (host, breaker, old state, new state)
CircuitListener = Callable[[str, CircuitBreaker, str, str], None]
_SUMMED = ("queue_depth", "in_flight", "requests", "responses", "errors", "failed_requests",
           "retries", "resumed", "queue_rejected", "queue_timeouts", "opened_count")


class HostState:
    """What the client knows about one upstream host."""

    def __init__(self, host: str, settings: UpstreamSettings, metrics: Metrics,
                 on_circuit_change: Optional[CircuitListener] = None) -> None:
        """``on_circuit_change``: the client's seam for state shared by replicas
        (gateway/shared/ publishes this replica's openings to the others)."""
        self.host = host
        self.label = label = metrics.host_label(host)
        m = metrics

        def limiter_changed(lim: HostLimiter) -> None:
            m.upstream_queue_depth.labels(host=label).set(lim.queue_depth)
            m.upstream_connections.labels(host=label).set(lim.in_flight)
            m.upstream_rate.labels(host=label).set(lim.rate)

        def circuit_changed(br: CircuitBreaker, old: str, new: str) -> None:
            m.circuit_state.labels(host=label).set(CIRCUIT_STATES[new])
            self._log_transition(br, old, new)
            if on_circuit_change is not None:
                on_circuit_change(host, br, old, new)

        self.limiter = HostLimiter(host, settings.limit_for(host), on_change=limiter_changed)
        self.breaker = CircuitBreaker(host, settings.circuit, on_change=circuit_changed)
        m.circuit_state.labels(host=label).set(0)
        m.upstream_rate.labels(host=label).set(self.limiter.rate)
        self.last_status: Optional[int] = None
        self.last_error: Optional[str] = None
        self.last_at: Optional[float] = None
        self.requests = 0
        self.responses = 0
        self.errors = 0
        self.retries = 0
        self.resumes = 0
        #: requests that ended in failure (after their retries): what the circuit counts
        self.failed_requests = 0
        #: monotonic time the current outage began (the circuit left "closed"), and the counts then
        self._outage: Optional[tuple[float, int, int]] = None

    def request_failed(self, status: Optional[int], what: str, probe: bool = False) -> None:
        """One request (after its retries) failed for a reason that is the host's."""
        self.failed_requests += 1
        self.breaker.failure(status, what, probe=probe)

    def _log_transition(self, br: CircuitBreaker, old: str, new: str) -> None:
        """An outage is logged once at warning when it begins and once when it ends; the
        open / half-open steps in between are info (a probe every ``open_for`` is routine)."""
        if old == CLOSED:
            self._outage = (time.monotonic(), self.failed_requests, self.errors)
            log.warning("upstream_outage", host=self.host, why=br.why or None,
                        retry_in_seconds=round(br.remaining() or 0.0, 3),
                        failed_requests=self.failed_requests, errors=self.errors)
        elif new == CLOSED and self._outage is not None:
            began, failed, errors = self._outage
            self._outage = None
            log.warning("upstream_recovered", host=self.host,
                        outage_seconds=round(time.monotonic() - began, 3),
                        probes_failed=self.failed_requests - failed,
                        errors=self.errors - errors)
        else:
            log.info("circuit_transition", host=self.host, old=old, new=new, why=br.why or None,
                     remaining_seconds=round(br.remaining() or 0.0, 3))

    @property
    def configured(self) -> bool:
        """Named in the configuration (its own metric label, never forgotten)."""
        return self.label == self.host

    def idle(self) -> bool:
        """Nothing here is worth keeping: no request in flight or waiting, a quiet circuit."""
        lim, br = self.limiter, self.breaker
        return (lim.in_flight == 0 and lim.queue_depth == 0 and br.state == CLOSED
                and br.failures == 0)

    def health(self) -> dict:
        info = self.breaker.snapshot()
        lim = self.limiter
        info.update({
            "rate": round(lim.current_rate(), 4),
            "configured_rate": lim.cfg.rate,
            "queue_depth": lim.queue_depth,
            "in_flight": lim.in_flight,
            "max_concurrency": lim.cfg.max_concurrency,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "last_seconds_ago": (round(time.monotonic() - self.last_at, 1)
                                 if self.last_at else None),
            "requests": self.requests, "responses": self.responses, "errors": self.errors,
            "failed_requests": self.failed_requests,
            "retries": self.retries, "resumed": self.resumes,
            "queue_rejected": lim.rejected_full, "queue_timeouts": lim.timed_out,
        })
        return info


def fold_health(entries: list[dict]) -> dict:
    """One health record for many unconfigured hosts: counters summed, the worst circuit, the
    most recent status and error; ``hosts`` and ``open_circuits`` say how many stand behind it."""
    worst = max(entries, key=lambda e: (CIRCUIT_STATES.get(e["state"], 0),
                                        e["remaining_seconds"] or 0.0))
    recent = min(entries, key=lambda e: (e["last_seconds_ago"] is None,
                                         e["last_seconds_ago"] or 0.0))
    out = {k: worst[k] for k in ("state", "remaining_seconds", "open_until", "why")}
    out.update({k: sum(e[k] for e in entries) for k in _SUMMED})
    out.update({
        "consecutive_failures": max(e["consecutive_failures"] for e in entries),
        "rate": None, "configured_rate": None, "max_concurrency": None,
        "last_status": recent["last_status"], "last_error": recent["last_error"],
        "last_seconds_ago": recent["last_seconds_ago"],
        "hosts": len(entries),
        "open_circuits": sum(1 for e in entries if e["state"] != CLOSED),
    })
    return out


class HostTable:
    """Host → :class:`HostState`, most recently used last, bounded for unconfigured hosts."""

    def __init__(self, settings: UpstreamSettings, metrics: Metrics,
                 max_hosts: int = MAX_TRACKED_HOSTS,
                 on_circuit_change: Optional[CircuitListener] = None) -> None:
        self._settings = settings
        self._on_circuit_change = on_circuit_change
        self._metrics = metrics
        self._max = max_hosts
        self._hosts: dict[str, HostState] = {}

    def __len__(self) -> int:
        return len(self._hosts)

    def __iter__(self) -> Iterator[HostState]:
        return iter(list(self._hosts.values()))

    def get(self, host: str) -> Optional[HostState]:
        return self._hosts.get(host.lower())

    def reconfigure(self, settings: UpstreamSettings) -> None:
        """New limits and circuit settings for known hosts and those created from now on
        (live reload); a limiter keeps its current rate when that is below the new ceiling."""
        self._settings = settings
        for st in self._hosts.values():
            cfg = settings.limit_for(st.host)
            st.limiter.cfg = cfg
            st.limiter.rate = min(st.limiter.rate, float(cfg.rate))
            st.breaker.cfg = settings.circuit

    def state(self, host: str) -> HostState:
        """The state of ``host``, created on first use; marks it most recently used."""
        host = host.lower()
        st = self._hosts.pop(host, None)
        if st is None:
            st = HostState(host, self._settings, self._metrics, self._on_circuit_change)
        self._hosts[host] = st
        if len(self._hosts) > self._max:
            self._evict_idle()
        return st

    def _evict_idle(self) -> None:
        """Forget the least recently used unconfigured hosts with nothing to remember."""
        excess = len(self._hosts) - self._max
        for host in list(self._hosts):      # oldest first; bounded by the number of hosts
            if excess <= 0:
                return
            st = self._hosts[host]
            if st.configured or not st.idle():
                continue
            del self._hosts[host]
            excess -= 1

    def health(self) -> dict[str, dict]:
        """Per configured host; every other host folded into :data:`OTHER`."""
        out: dict[str, dict] = {}
        others: list[dict] = []
        for host, st in sorted(self._hosts.items()):
            if st.configured:
                out[host] = st.health()
            else:
                others.append(st.health())
        if others:
            out[OTHER] = fold_health(others)
        return out
