"""Retry, push back or accept: what to do with one response head, as a pure function.

Everything the decision depends on is in :class:`Facts` (status, the Retry-After field, the
small error body, the rate-limit reset, where the request stands in its attempts and deadline,
and the jittered backoff drawn for this attempt); :func:`decide` returns a :class:`Verdict` and
the hop (``hop.py``) carries it out (sleep, open the circuit, count). Being pure it is tested as
a table (``tests/test_upstream_decide.py``).

The rules, in order:

1. an exhausted primary rate limit (403/429 with ``X-RateLimit-Remaining: 0`` and a reset in the
   future, GitHub's) → :attr:`Action.RATE_LIMITED` for the response's Retry-After, else until
   the reset: no retry, the circuit opens, clients get 429;
2. any status other than 429/502/503/504 and 403-with-Retry-After → :attr:`Action.ACCEPT`
   (a success for the circuit below 500, a failure from 500);
3. a Retry-After (field, or for 429/503 the body's ghcr.io-style hint) longer than
   ``retry_after_max``, or on a throttle/503 at least ``long_retry_after`` →
   :attr:`Action.PUSHBACK`: the circuit opens for it instead of the request sleeping;
4. a half-open probe → :attr:`Action.FAIL` (one try only);
5. a retry would be the last-plus-one attempt, the body could not be buffered, the request is
   not idempotent, or the wait would pass the deadline → :attr:`Action.FAIL`;
6. otherwise :attr:`Action.RETRY` after ``max(backoff, Retry-After, retry_after_min)`` (the
   Retry-After floor only when the upstream sent one).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Optional

from ..settings import CircuitSettings, RetrySettings
from .retry_after import parse_retry_after_body, parse_retry_after_header

RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: statuses with which an upstream reports an exhausted rate limit (X-RateLimit-Remaining: 0)
RATE_LIMIT_STATUSES = frozenset({403, 429})


class Action(StrEnum):
    ACCEPT = "accept"              # hand the response on (a success for the circuit below 500)
    FAIL = "fail"                  # hand it on; counts as a failure of the host
    RETRY = "retry"                # sleep ``Verdict.delay``, then try again
    PUSHBACK = "pushback"          # the host asked for a long pause: open the circuit for it
    RATE_LIMITED = "rate_limited"  # the host's rate limit is exhausted until its reset


@dataclass(frozen=True)
class Facts:
    status: int
    #: the Retry-After field as sent (None: absent)
    retry_after: Optional[str] = None
    #: the error body read so far (for ghcr.io's "retry-after: 35.852µs" hint)
    body: bytes = b""
    #: seconds until an exhausted rate limit resets (None: not exhausted)
    reset_in: Optional[float] = None
    #: 0-based number of this attempt, and how many the request may make
    attempt: int = 0
    attempts: int = 1
    #: the whole error body is in ``body`` (a retry would not leave a half-read connection)
    buffered: bool = True
    idempotent: bool = True
    probe: bool = False
    #: seconds until the request's deadline
    time_left: float = 60.0
    #: the jittered exponential backoff drawn for this attempt
    backoff: float = 0.0
    #: wall-clock now (``time.time()``), for a Retry-After given as an HTTP date
    now: float = 0.0


@dataclass(frozen=True)
class Verdict:
    action: Action
    #: RETRY: seconds to sleep; PUSHBACK / RATE_LIMITED: seconds the host asked for
    wait: float = 0.0
    #: the Retry-After the host sent (field, or the body's hint), parsed
    retry_after: Optional[float] = None
    #: the host throttled the gateway (429, 403 with Retry-After, rate limit): cut its rate
    throttled: bool = False
    #: the error body had to be read before deciding (the hop buffers it)
    read_body: bool = False

    @property
    def retry_reason(self) -> str:
        """Label of the retry metric."""
        return "status_429" if self.throttled else "status_5xx"


def needs_body(status: int, retry_after_present: bool, reset_in: Optional[float]) -> bool:
    """Whether the (small) error body must be read before :func:`decide` can answer."""
    return ((status in RATE_LIMIT_STATUSES and reset_in is not None)
            or status in RETRY_STATUSES or (status == 403 and retry_after_present))


def decide(f: Facts, retry: RetrySettings, circuit: CircuitSettings) -> Verdict:
    header_ra = parse_retry_after_header(f.retry_after, now=f.now)
    if f.status in RATE_LIMIT_STATUSES and f.reset_in is not None:
        wait = header_ra if header_ra is not None else f.reset_in
        return Verdict(Action.RATE_LIMITED, wait, retry_after=header_ra, throttled=True,
                       read_body=True)
    # a 403 that carries Retry-After is a throttle, not a refusal (GitHub's secondary rate
    # limits answer 403 or 429 with Retry-After while X-RateLimit-Remaining is left)
    throttled = f.status == 429 or (f.status == 403 and f.retry_after is not None)
    if f.status not in RETRY_STATUSES and not throttled:
        return Verdict(Action.FAIL if f.status >= 500 else Action.ACCEPT)
    ra = header_ra
    if ra is None and f.body and f.status in (429, 503):
        ra = parse_retry_after_body(f.body)
    common = dict(retry_after=ra, throttled=throttled, read_body=True)
    if ra is not None and (ra > retry.retry_after_max or
                           ((throttled or f.status == 503) and ra >= circuit.long_retry_after)):
        return Verdict(Action.PUSHBACK, ra, **common)
    if f.probe:
        return Verdict(Action.FAIL, **common)
    delay = f.backoff
    if ra is not None:
        delay = max(delay, ra, float(retry.retry_after_min))
    if (f.attempt + 1 >= f.attempts or not f.buffered or not f.idempotent
            or delay >= f.time_left):
        return Verdict(Action.FAIL, **common)
    return Verdict(Action.RETRY, delay, **common)
