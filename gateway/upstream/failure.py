"""What went wrong with one attempt, in words an operator can read, and whose fault it was.

aiohttp's exception texts carry object reprs (``Connection<ConnectionKey(host=…, ssl=<ssl.SSLContext
object at 0x…>, …)>``); they reach a client's reason phrase and /api/status ``last_error`` through
:class:`~gateway.upstream.types.UpstreamError` messages, so :func:`describe` words them itself.

A request body that fails on the *client's* side (bad chunk framing, a hang-up mid-upload) surfaces
from aiohttp as a ``ClientConnectionError`` whose cause is the body iterator's
:class:`~gateway.exchange.ClientBodyError`; :func:`client_body_error` finds it so that the attempt
is never counted against the upstream (circuit breaker, retries, health).
"""
from __future__ import annotations

import asyncio
import os
import socket
import ssl
from typing import Optional

import aiohttp

from ..exchange import ClientBodyError
from .resolver import GuardRefused
from .types import Reason


#: getaddrinfo answers that are not worth a retry (EAI_AGAIN, a DNS server not answering, is)
PERMANENT_DNS_ERRORS = frozenset(e for e in (socket.EAI_NONAME, socket.EAI_FAIL,
                                             getattr(socket, "EAI_NODATA", None)) if e is not None)


class AttemptFailed(Exception):
    """One try produced no response head; ``upstream_fault`` says whether the host is to blame."""

    def __init__(self, reason: Reason, message: str, status: int, retryable: bool, *,
                 upstream_fault: Optional[bool] = None) -> None:
        super().__init__(message)
        #: whether this counts against the host's circuit (our own queue does not, nor SSRF)
        self.upstream_fault = reason != Reason.SSRF if upstream_fault is None else upstream_fault
        self.reason = reason
        self.message = message
        self.status = status
        self.retryable = retryable


def client_body_error(exc: BaseException) -> Optional[ClientBodyError]:
    """The client-side body failure behind ``exc`` (aiohttp wraps it), if that is what it was."""
    seen: set[int] = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:   # bounded: each exception visited once
        if isinstance(cur, ClientBodyError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _os_text(err: BaseException) -> str:
    if isinstance(err, socket.gaierror):
        return f"name lookup failed ({err.strerror or err})"
    if isinstance(err, OSError) and (err.errno or err.strerror):
        return os.strerror(err.errno) if err.errno and err.errno > 0 else str(err.strerror)
    return str(err) or type(err).__name__


def describe(exc: BaseException) -> str:
    """A short readable account of an aiohttp/OS failure (no object reprs, no URL queries)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _os_text(exc.os_error)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        cause = exc.__cause__
        return "the response body was cut short" + (f" ({_os_text(cause)})" if cause else "")
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "no data within upstream.read_timeout"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"malformed response ({exc.message})" if exc.message else "malformed response"
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):
        return _os_text(exc)
    cause = exc.__cause__
    if isinstance(exc, aiohttp.ClientConnectionError):
        # "Failed to send bytes into the underlying connection Connection<ConnectionKey(…)>: …"
        return ("the connection failed" + (f" ({describe(cause)})" if cause is not None else ""))
    text = str(exc)
    if "<" in text or "ConnectionKey" in text:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def classify(exc: BaseException, host: str, deadline_hit: bool, budget: float) -> AttemptFailed:
    """Turn what ``session.request`` raised into an :class:`AttemptFailed`."""
    body = client_body_error(exc)
    if body is not None:
        return AttemptFailed(Reason.CLIENT_BODY, f"the client's request body failed ({body}); "
                             f"{host} is not to blame", 400, False, upstream_fault=False)
    if deadline_hit:
        return AttemptFailed(Reason.DEADLINE, f"no response from {host} within the deadline "
                             f"({budget:.1f}s left when the attempt started)", 504, False)
    if isinstance(exc, aiohttp.ClientConnectorDNSError) and isinstance(exc.os_error, GuardRefused):
        return AttemptFailed(Reason.SSRF, str(exc.os_error), 403, False)
    if (isinstance(exc, aiohttp.ClientConnectorDNSError)
            and isinstance(exc.os_error, socket.gaierror)
            and exc.os_error.errno in PERMANENT_DNS_ERRORS):
        # the name does not exist: asking again in a second will not change that
        return AttemptFailed(Reason.DNS, f"cannot resolve {host}: {_os_text(exc.os_error)}",
                             502, False)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        err = exc.certificate_error
        why = getattr(err, "verify_message", None) or getattr(err, "reason", None) or str(err)
        return AttemptFailed(Reason.TLS, f"TLS with {host} failed: certificate verify failed "
                             f"({why})", 502, False)
    if isinstance(exc, (aiohttp.ClientSSLError, ssl.SSLError)):
        err = exc.os_error if isinstance(exc, aiohttp.ClientSSLError) else exc
        return AttemptFailed(Reason.TLS, f"TLS with {host} failed: "
                             f"{getattr(err, 'reason', None) or _os_text(err)}", 502, False)
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return AttemptFailed(Reason.CONNECT, f"parent proxy refused CONNECT to {host}: "
                             f"{exc.status} {exc.message}", 502, True)
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return AttemptFailed(Reason.TIMEOUT, f"timed out talking to {host}: {describe(exc)}",
                             504, True)
    if isinstance(exc, aiohttp.ClientResponseError):
        return AttemptFailed(Reason.PROTOCOL, f"bad response from {host}: {describe(exc)}",
                             502, True)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return AttemptFailed(Reason.CONNECT, f"cannot reach {host}: {describe(exc)}", 502, True)
    return AttemptFailed(Reason.PROTOCOL, f"request to {host} failed: {describe(exc)}",
                         502, False)
