"""Parsing of the pushback hints upstreams send: ``Retry-After`` and ghcr.io's error-body text.

Three forms are understood:

* ``Retry-After: 120`` (delta-seconds; a fraction is tolerated),
* ``Retry-After: Wed, 21 Oct 2026 07:28:00 GMT`` (HTTP-date, relative to now),
* the Go-duration text ghcr.io puts in its error body,
  ``TOOMANYREQUESTS: retry-after: 35.852µs, allowed: 44000/minute`` (``1m30s``, ``250ms``, …).

:func:`rate_limit_reset_in` reads an exhausted primary rate limit (GitHub:
``X-RateLimit-Remaining: 0`` + ``X-RateLimit-Reset: <epoch seconds>``).

All functions are pure; values are returned as sent (seconds, never negative). Flooring to
``retry.retry_after_min`` and capping are the caller's business.
"""
from __future__ import annotations

import json
import math
import re
import time
from email.utils import parsedate_to_datetime
from typing import Optional

_GO_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|μs|ms|s|m|h))+$")
#: "retry-after: 35.852µs" / "Retry-After: 2s" / "retry after 30" inside an error body; the value
#: must end at a boundary, so "35.852\\u00b5s" (a JSON escape) is never read as 35.852 seconds
_BODY_HINT = re.compile(r"retry[-_ ]after\"?\s*[:=]?\s*\"?\s*([0-9][0-9.a-zµμ]*+)(?![\\\w])",
                        re.IGNORECASE)
#: JSON escapes of the micro sign (U+00B5) and Greek mu (U+03BC) in a raw body
_MICRO_ESCAPES = re.compile(r"\\u00b5|\\u03bc", re.IGNORECASE)


def parse_go_duration(text: str) -> Optional[float]:
    """``"1m30.5s"`` → 90.5; ``"35.852µs"`` → 3.5852e-05; a bare number is seconds."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if value >= 0 else None
    if not _GO_DURATION.match(text):
        return None
    return sum(float(num) * _GO_UNITS[unit] for num, unit in _GO_PART.findall(text))


def parse_retry_after_header(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header value (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 else None
    go = parse_go_duration(value)
    if go is not None:
        return go
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def rate_limit_reset_in(headers, now: Optional[float] = None) -> Optional[float]:
    """Seconds until an exhausted rate limit resets: ``X-RateLimit-Remaining: 0`` and an
    ``X-RateLimit-Reset`` (epoch seconds) in the future; None otherwise (budget left, no or
    unparsable reset, a reset already past)."""
    remaining = (headers.get("X-RateLimit-Remaining") or "").strip()
    reset = (headers.get("X-RateLimit-Reset") or "").strip()
    if remaining != "0" or not reset:
        return None
    try:
        when = float(reset)
    except ValueError:
        return None
    if not math.isfinite(when):
        return None
    now = time.time() if now is None else now
    left = when - now
    return left if left > 0 else None


def parse_retry_after_body(body: bytes | str) -> Optional[float]:
    """The hint ghcr.io embeds in a 429 body (``retry-after: 35.852µs``), if any."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    # An OCI error document is JSON and may escape non-ASCII ("35.852\\u00b5s"): look at its
    # decoded strings first, then at the raw text with the micro-sign escapes undone.
    for text in (*_json_strings(body), _MICRO_ESCAPES.sub("µ", body)):
        m = _BODY_HINT.search(text)
        if m:
            value = parse_go_duration(m.group(1).rstrip(".,"))
            if value is not None:
                return value
    return None


def _json_strings(body: str) -> list[str]:
    stripped = body.lstrip()
    if not stripped.startswith(("{", "[")):
        return []
    try:
        doc = json.loads(stripped)
    except ValueError:
        return []
    out: list[str] = []
    stack = [doc]
    while stack and len(out) < 100:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return out
