"""The retry-vs-pushback decision (``gateway/upstream/decide.py``) as a table."""
from __future__ import annotations

import pytest

from gateway.settings import CircuitSettings, RetrySettings
from gateway.upstream.decide import Action, Facts, Verdict, decide, needs_body

RETRY = RetrySettings(attempts=4, retry_after_min=1, retry_after_max=30, deadline=120)
CIRCUIT = CircuitSettings(long_retry_after=60, max_open_for=3600)
GHCR_BODY = (b'{"errors":[{"code":"TOOMANYREQUESTS","message":"retry-after: 35.852\xc2\xb5s, '
             b'allowed: 44000/minute"}]}')
NOW = 1_800_000_000.0


def F(status: int, **kw) -> Facts:
    kw.setdefault("attempts", 4)
    kw.setdefault("backoff", 0.25)
    kw.setdefault("now", NOW)
    return Facts(status=status, **kw)


# (facts, action, wait, retry_after, throttled)
TABLE = [
    # plain answers: no retry; 5xx that is not retryable counts as a failure
    (F(200), Action.ACCEPT, 0.0, None, False),
    (F(404), Action.ACCEPT, 0.0, None, False),
    (F(403), Action.ACCEPT, 0.0, None, False),
    (F(500), Action.FAIL, 0.0, None, False),
    (F(501), Action.FAIL, 0.0, None, False),
    # retryable statuses: backoff, Retry-After floored to retry_after_min
    (F(503), Action.RETRY, 0.25, None, False),
    (F(502, attempt=2), Action.RETRY, 0.25, None, False),
    (F(429, retry_after="0"), Action.RETRY, 1.0, 0.0, True),
    (F(429, retry_after="5"), Action.RETRY, 5.0, 5.0, True),
    (F(503, retry_after="2", backoff=3.0), Action.RETRY, 3.0, 2.0, False),
    # ghcr.io's µs hint in the body, floored
    (F(429, body=GHCR_BODY), Action.RETRY, 1.0, pytest.approx(35.852e-6), True),
    (F(502, body=GHCR_BODY), Action.RETRY, 0.25, None, False),     # body hints: 429/503 only
    # GitHub secondary rate limit: 403 with Retry-After is a throttle
    (F(403, retry_after="3"), Action.RETRY, 3.0, 3.0, True),
    (F(403, retry_after="soon"), Action.RETRY, 0.25, None, True),  # unparsable still throttles
    # long Retry-After: the circuit opens instead of sleeping
    (F(429, retry_after="1800"), Action.PUSHBACK, 1800.0, 1800.0, True),
    (F(503, retry_after="60"), Action.PUSHBACK, 60.0, 60.0, False),
    (F(502, retry_after="45"), Action.PUSHBACK, 45.0, 45.0, False),  # > retry_after_max
    (F(502, retry_after="59"), Action.PUSHBACK, 59.0, 59.0, False),
    (F(503, retry_after="30"), Action.RETRY, 30.0, 30.0, False),     # = retry_after_max: waits
    (F(429, retry_after="Sat, 01 Jan 2027 00:00:00 GMT", now=1798761600 - 10),
     Action.RETRY, 10.0, 10.0, True),
    # exhausted primary rate limit: until the reset, or the response's Retry-After
    (F(403, reset_in=600.0), Action.RATE_LIMITED, 600.0, None, True),
    (F(429, reset_in=600.0, retry_after="20"), Action.RATE_LIMITED, 20.0, 20.0, True),
    (F(404, reset_in=600.0), Action.ACCEPT, 0.0, None, False),       # only 403/429
    # no retry left, or not allowed: the bad status is handed on as a failure
    (F(503, attempt=3), Action.FAIL, 0.0, None, False),
    (F(503, idempotent=False, attempts=1), Action.FAIL, 0.0, None, False),
    (F(503, buffered=False), Action.FAIL, 0.0, None, False),
    (F(429, retry_after="5", time_left=4.0), Action.FAIL, 0.0, 5.0, True),
    (F(503, probe=True), Action.FAIL, 0.0, None, False),
    (F(503, probe=True, retry_after="120"), Action.PUSHBACK, 120.0, 120.0, False),
]


@pytest.mark.parametrize("facts,action,wait,retry_after,throttled", TABLE)
def test_decide(facts, action, wait, retry_after, throttled):
    v = decide(facts, RETRY, CIRCUIT)
    assert (v.action, v.wait, v.retry_after, v.throttled) == (action, wait, retry_after,
                                                             throttled), v


@pytest.mark.parametrize("status,retry_after_present,reset_in,expected", [
    (200, False, None, False), (404, False, None, False), (500, False, None, False),
    (403, False, None, False), (403, True, None, True), (403, False, 10.0, True),
    (429, False, None, True), (502, False, None, True), (503, False, None, True),
    (504, False, None, True), (404, False, 10.0, False),
])
def test_needs_body(status, retry_after_present, reset_in, expected):
    assert needs_body(status, retry_after_present, reset_in) is expected


def test_retry_reason_label():
    assert Verdict(Action.RETRY, throttled=True).retry_reason == "status_429"
    assert Verdict(Action.RETRY).retry_reason == "status_5xx"
