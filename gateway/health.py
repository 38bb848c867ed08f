"""What the status page and /api/status say about the gateway's health, beyond "ready".

Why separate from readiness: /readyz answers "should traffic be sent to this process" (it is
accepting and not draining). A gateway whose upstreams all fail is still worth sending traffic
to — it serves what it has cached, stale if allowed — and restarting it fixes nothing. So
readiness stays up, and *health* is reported as ``ok`` or ``degraded`` with the reasons, for the
person looking at the page and for alerting on /api/status.

Also here: the bounded log of recent policy refusals, each with the rule that would allow it,
so "my scan fails with 403" is answered on the status page.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from enum import StrEnum
from typing import Any, Iterable, Mapping, Optional

from .policy import Policy
from .policy.rules import Decision

#: refusals kept (distinct host:port pairs, most recent first)
DENIAL_LIMIT = 20


class HealthState(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    DRAINING = "draining"


def allow_hint(decision: Decision) -> str:
    """The configuration change that would let this target through (for people, not parsing)."""
    if decision.reason_code == "port" and decision.rule_index is not None:
        return f"add {decision.port} to policy.rules[{decision.rule_index}].ports"
    if decision.reason_code == "rule" and decision.rule_index is not None:
        return f"policy.rules[{decision.rule_index}] denies it: change or remove that rule"
    action = "intercept" if decision.port == 443 else "tunnel"
    return (f"add to policy.rules (before any catch-all): {{host: {decision.host}, "
            f"action: {action}, ports: [{decision.port}]}}")


class DenialLog:
    """The last :data:`DENIAL_LIMIT` distinct refused targets with counts."""

    def __init__(self, limit: int = DENIAL_LIMIT, clock=time.time) -> None:
        self._limit = limit
        self._clock = clock
        self._items: "OrderedDict[tuple[str, int], dict]" = OrderedDict()

    def record(self, decision: Decision) -> None:
        key = (decision.host, decision.port)
        item = self._items.pop(key, None) or {"host": decision.host, "port": decision.port,
                                               "count": 0}
        item.update(count=item["count"] + 1, reason=decision.reason, last_at=self._clock(),
                    allow=allow_hint(decision))
        self._items[key] = item
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def snapshot(self) -> list[dict]:
        now = self._clock()
        return [dict(item, seconds_ago=max(0.0, now - item["last_at"]))
                for item in reversed(self._items.values())]


class RecordingPolicy(Policy):
    """The policy, recording every refusal in a :class:`DenialLog` (decisions unchanged)."""

    def __init__(self, settings: Any, denials: DenialLog) -> None:
        super().__init__(settings)
        self.denials = denials

    def decide(self, host: str, port: int, *, plain_http: bool = False) -> Decision:
        decision = super().decide(host, port, plain_http=plain_http)
        if not decision.allowed:
            self.denials.record(decision)
        return decision


def recent_errors(upstreams: Mapping[str, Mapping]) -> list[dict]:
    """Upstreams whose last request failed, most recent first."""
    out = []
    for host, info in upstreams.items():
        failures = info.get("consecutive_failures") or 0
        if info.get("last_error") and failures:
            out.append({"host": host, "error": info["last_error"],
                        "consecutive_failures": failures,
                        "seconds_ago": info.get("last_seconds_ago")})
    return sorted(out, key=lambda e: e["seconds_ago"] if e["seconds_ago"] is not None else 1e18)


def assess(upstreams: Mapping[str, Mapping], artifacts: Iterable[Mapping],
           draining: bool = False) -> dict:
    """``{"state": "ok" | "degraded" | "draining", "reasons": [...]}``."""
    reasons = []
    for host in sorted(upstreams):
        info = upstreams[host]
        circuit = info.get("circuit") or info.get("state") or "closed"
        remaining: Optional[float] = info.get("open_remaining") or info.get("remaining_seconds")
        why = f" ({info['why']})" if info.get("why") else ""
        if circuit == "open":
            when = f"; next try in {remaining:.0f}s" if remaining else ""
            reasons.append(f"{host}: circuit open{why}{when}: requests fail fast or are served "
                           "from cache")
        elif circuit == "half_open":
            reasons.append(f"{host}: circuit half-open{why}: probing whether it recovered")
        elif info.get("consecutive_failures") and info.get("last_error"):
            reasons.append(f"{host}: last {info['consecutive_failures']} request(s) failed: "
                           f"{info['last_error']}")
    for artifact in artifacts:
        if artifact.get("stale") is True:
            reasons.append(f"serving a stale {artifact.get('artifact')} "
                           f"({artifact.get('reference')}): its upstream could not refresh it")
    state = (HealthState.DRAINING if draining
             else HealthState.DEGRADED if reasons else HealthState.OK)
    return {"state": str(state), "reasons": reasons}
