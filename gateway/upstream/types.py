"""The contract between the cache layer and the upstream client.

The cache describes what it wants (:class:`UpstreamRequest`); the upstream layer owns everything
about getting it: pooled connections, TLS verification, address overrides, parent proxy,
credentials, retries with backoff, Retry-After, per-host smoothing, circuit breaking and Range
resume of bodies cut mid-way. It answers with an :class:`UpstreamResponse` (any status, including
429/5xx after retries are exhausted) or raises :class:`UpstreamError` when there is no response
to give (connection refused, deadline, circuit open, queue full).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import AsyncIterable, AsyncIterator, Optional

from multidict import CIMultiDict, CIMultiDictProxy


@dataclass
class UpstreamRequest:
    method: str
    #: absolute URL, ``https://host[:port]/path?query``
    url: str
    #: end-to-end headers to send; Host is derived from the URL
    headers: CIMultiDict = field(default_factory=CIMultiDict)
    body: Optional[AsyncIterable[bytes]] = None
    #: follow 301/302/303/307/308 (Authorization and injected credentials are dropped when the
    #: redirect goes to another host); ``UpstreamResponse.history`` records the hops
    follow_redirects: bool = False
    #: absolute ``loop.time()`` by which a response must have been obtained (None: the configured
    #: retry.deadline from now)
    deadline: Optional[float] = None
    #: a body cut mid-way is resumed with ``Range`` from the byte reached (GET, 200 with a
    #: validator or known length only); the caller still verifies digests
    resumable: bool = False
    #: ("registry", "repository"): ignore any client Authorization and authenticate with the
    #: gateway's own (anonymous or configured) registry token for that repository
    registry_auth: Optional[tuple[str, str]] = None
    #: label for logs/metrics ("oci_blob", "maven", …)
    kind: str = "generic"


class UpstreamResponse:
    """Response head plus a body stream that must be consumed or released."""

    status: int
    reason: str
    headers: CIMultiDictProxy
    #: final URL after redirects
    url: str
    #: redirects followed: ((status, location), …)
    history: tuple[tuple[int, str], ...]

    def iter_chunks(self) -> AsyncIterator[bytes]:  # pragma: no cover - interface
        """Body bytes as they arrive; transparently resumed when ``resumable`` was set.

        Raises :class:`UpstreamError` (reason ``"body"``) if the body cannot be completed.
        """
        raise NotImplementedError

    async def read(self, limit: int = 16 * 1024 * 1024) -> bytes:  # pragma: no cover
        """Whole body for small responses; raises UpstreamError if it exceeds ``limit``."""
        raise NotImplementedError

    async def release(self) -> None:  # pragma: no cover
        """Return/close the connection; safe to call more than once."""
        raise NotImplementedError


class Reason(StrEnum):
    """Why there is no response (:attr:`UpstreamError.reason`; a metric/log label value)."""

    CONNECT = "connect"                  # refused, reset, unreachable, parent proxy refused
    DNS = "dns"                          # the name does not exist (permanent: not retried)
    TLS = "tls"                          # handshake or certificate verification failed
    TIMEOUT = "timeout"                  # connect or read timeout (retried)
    DEADLINE = "deadline"                # the request's overall deadline passed
    CIRCUIT_OPEN = "circuit_open"        # the host's circuit is open: nothing was sent
    QUEUE_FULL = "queue_full"            # the host's limiter queue is full
    QUEUE_TIMEOUT = "queue_timeout"      # waited queue_timeout for a limiter slot
    BODY = "body"                        # the response body broke and could not be resumed
    SSRF = "ssrf"                        # the address guard refused every address
    PROTOCOL = "protocol"                # malformed response, bad URL, too many redirects …
    CLIENT_BODY = "client_body"          # the *client's* request body failed (not the host's)
    INSECURE_REDIRECT = "insecure_redirect"  # an https URL redirected to plain http: refused
    CANCELLED = "cancelled"              # the gateway is shutting down


class UpstreamError(Exception):
    """No usable response. ``status`` is what a client should get if nothing else can answer."""

    def __init__(self, reason: Reason, host: str, message: str, *, status: int = 502,
                 retry_after: Optional[float] = None) -> None:
        self.reason = Reason(reason)
        self.host = host
        self.status = status
        self.retry_after = retry_after
        self.message = message
        super().__init__(f"{host}: {message}")
