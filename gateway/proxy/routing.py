"""Where a client request goes, decided without awaiting: the proxy's own refusals, CONNECT,
or an :class:`~gateway.exchange.Exchange` for the pipeline.

Every check a request passes before the pipeline sees it lives here — the Host field (RFC 9112
§3.2), the request target's form, proxy authentication and its lockout, the policy's decision,
the intercepted connection's authority (421 for another), the framing of a request body — as
synchronous methods of :class:`RequestRouter`, a mixin of the client connection. Synchronous
because both of the connection's schedulers use them (``docs/hit-path.md``): callback mode
prepares a request inside ``data_received`` and the task gets it prepared; each request is
routed once, so the metrics a refusal counts are counted once.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Union

from multidict import CIMultiDict

from ..exchange import EmptyBody, Exchange, Response, error_response
from . import http1
from .request import AccessRecord, RequestBody, RequestFields
from .targets import TargetError, authority, is_absolute, parse_absolute, parse_authority

if TYPE_CHECKING:  # pragma: no cover
    from ..observability.metrics import Metrics
    from ..settings.proxy import ProxySettings
    from .server import ProxyServer


class Reply:
    """An answer the connection gives itself (an error, ``OPTIONS *``): always in memory."""

    __slots__ = ("response", "close", "extra_headers")

    def __init__(self, response: Response, close: bool = False,
                 extra_headers: Optional[dict] = None) -> None:
        self.response = response
        self.close = close
        self.extra_headers = extra_headers


class _Connect:
    """Routing result of a CONNECT on the plain side: only the task can serve it."""

    __repr__ = lambda self: "CONNECT"  # noqa: E731


CONNECT = _Connect()

#: what routing a request gives: an exchange for the pipeline, a reply, or CONNECT
Routed = Union[Exchange, Reply, _Connect]


class Prepared:
    """A request after :meth:`ClientConnection._prepare`: its access record, its sorted header
    fields and where it goes. Made once per request, by whichever mode takes it first."""

    __slots__ = ("rec", "headers", "routed", "tried")

    def __init__(self, rec: AccessRecord, headers: RequestFields, routed: object) -> None:
        self.rec = rec
        self.headers = headers
        #: a :data:`Routed` (the mirror door's connection routes to its own kinds)
        self.routed = routed
        #: the synchronous answer was asked for and declined: the task need not ask again
        self.tried = False


class RequestRouter:
    """The routing half of :class:`~.connection.ClientConnection` (a mixin). It reads the
    connection's ``server`` (policy, auth, metrics), ``settings`` (``proxy.*``), ``client`` /
    ``client_ip``, the CONNECT authority of an intercepted connection (``tls_host``/``tls_port``)
    and ``_host_ok`` (the Host already checked on this connection), and creates request bodies
    that read from the connection (:class:`~.request.RequestBody`)."""

    server: "ProxyServer"
    settings: "ProxySettings"
    metrics: "Metrics"
    client: str
    client_ip: str
    tls_host: Optional[str]
    tls_port: int
    _host_ok: Optional[str]

    def _refusal(self, rec: AccessRecord, status: int, message: str, *, reason: str = "",
                 close: bool = False, extra_headers: Optional[dict] = None,
                 client_error: Optional[str] = None) -> Reply:
        if client_error:
            # a client that sends what a proxy cannot use is misconfigured: do not keep it
            self.metrics.client_errors.labels(reason=client_error).inc()
            rec.error = message
            close = True
        return Reply(error_response(status, message, reason=reason), close, extra_headers)

    def _route(self, request: http1.RequestHead, rec: AccessRecord,
               headers: RequestFields) -> Routed:
        method = request.method
        target = request.target
        host_problem = self._host_field_problem(request, headers)
        if host_problem:
            rec.path = target.split("?", 1)[0][:200]
            return self._refusal(rec, 400, host_problem, reason=f"Bad Request: {host_problem}",
                                 client_error="bad_host")
        if self.tls_host is not None:
            return self._route_intercepted(request, rec, target, headers)
        if method == "CONNECT":
            return CONNECT
        if is_absolute(target):
            return self._route_absolute(request, rec, target, headers)
        rec.path = target.split("?", 1)[0][:200]
        return self._refusal(
            rec, 400,
            f"trivy-gateway is a forward proxy, not a web server: got {method} {target[:200]}. "
            "Point clients at it with HTTPS_PROXY=http://<gateway>:<port> (CONNECT) or "
            "HTTP_PROXY (absolute-form requests such as GET http://host/path).",
            reason="Bad Request: this is a proxy, send CONNECT or an absolute URL",
            client_error="not_proxy_request")

    def _host_field_problem(self, request: http1.RequestHead, headers: RequestFields) -> str:
        """RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host field, any request at most
        one, and its value is a valid authority (or empty); '' when all is well."""
        count = headers.host_count
        if count > 1:
            return f"{count} Host header fields (exactly one is allowed)"
        if count == 0:
            return "missing Host header field" if request.http_version == "1.1" else ""
        value = headers.host
        # an empty value is allowed (§3.2); the Host this connection already accepted (the same
        # on every request of a kept-alive connection) was parsed then
        if value and value != self._host_ok:
            try:
                parse_authority(value, 80)
            except TargetError as exc:
                return f"bad Host header {value[:100]!r}: {exc}"
        return ""

    # -- proxy authentication and policy ---------------------------------------------------------
    def _auth_refusal(self, rec: AccessRecord, headers: RequestFields) -> Optional[Reply]:
        """None when the request may go on; otherwise the 407 or 429 to send.

        Wrong credentials count against the client's address (:class:`~.auth.FailureLimiter`);
        a locked-out address is answered 429 without its credentials being looked at.
        """
        auth = self.server.auth
        if not auth.enabled:
            return None
        limiter = auth.failures
        locked = limiter.locked_for(self.client_ip)
        if locked is not None:
            self.metrics.client_errors.labels(reason="auth_locked_out").inc()
            message = (f"too many failed proxy authentications from {self.client_ip}; "
                       f"retry in {math.ceil(locked)} s (proxy.auth.max_failures)")
            rec.error = message
            return self._refusal(rec, 429, message, reason="Too Many Requests",
                                 extra_headers={"Retry-After": str(math.ceil(locked))},
                                 close=True)
        if auth.check(headers.proxy_auth):
            if headers.proxy_auth:
                limiter.succeeded(self.client_ip)
            return None
        self.metrics.proxy_auth_failures.inc()
        if headers.proxy_auth:                   # a wrong guess, not just the challenge leg
            limiter.failed(self.client_ip)
        rec.error = "proxy authentication required"
        return self._refusal(
            rec, 407, "proxy authentication required: put the credentials in the proxy URL, "
            "e.g. HTTPS_PROXY=http://user:password@gateway:3128",
            extra_headers={"Proxy-Authenticate": auth.challenge})

    def _denial(self, rec: AccessRecord, decision, *, close: bool = False) -> Reply:
        self.metrics.denied.labels(host=self.metrics.host_label(decision.host),
                                   reason=decision.reason_code).inc()
        rec.error = decision.reason
        if decision.reason_code == "rule":
            message = decision.reason
        else:
            message = (f"{decision.reason}\nTo allow it, add a rule to policy.rules in the gateway "
                       f"configuration, e.g.  - {{host: {decision.host}, action: intercept}}")
        return self._refusal(rec, 403, message, reason=decision.reason, close=close)

    # -- HTTP requests ----------------------------------------------------------------------
    def _route_absolute(self, request: http1.RequestHead, rec: AccessRecord, target: str,
                        headers: RequestFields) -> Routed:
        try:
            scheme, host, port, origin = parse_absolute(target)
        except TargetError as exc:
            return self._refusal(rec, 400, f"bad request target {target[:200]!r}: {exc}",
                                 reason=f"Bad request target: {exc}", client_error="bad_target")
        rec.scheme, rec.host, rec.port, rec.path = scheme, host, port, origin.split("?", 1)[0]
        if scheme != "http":
            return self._refusal(
                rec, 400, f"{scheme}:// URLs must be requested through CONNECT: set HTTPS_PROXY "
                "(not HTTP_PROXY) to the gateway, or request http:// URLs",
                reason="Bad Request: use CONNECT for https URLs", client_error="bad_target")
        refused = self._auth_refusal(rec, headers)
        if refused is not None:
            return refused
        decision = self.server.policy.decide(host, port, plain_http=True)
        rec.decision = decision.action
        if not decision.allowed:
            return self._denial(rec, decision)
        if decision.action != "intercept":
            rec.decision = "deny"
            self.metrics.denied.labels(host=self.metrics.host_label(host), reason="rule").inc()
            message = (f"{host} is allowed as a blind tunnel only ({decision.rule_key}); "
                       "plain-HTTP requests to it are not relayed: use https (CONNECT)")
            rec.error = message
            return self._refusal(rec, 403, message, reason=message)
        return self._build_exchange(request, rec, "http", host, port, origin, headers)

    def _route_intercepted(self, request: http1.RequestHead, rec: AccessRecord, target: str,
                           headers: RequestFields) -> Routed:
        host, port = self.tls_host, self.tls_port
        assert host is not None
        rec.scheme, rec.host, rec.port, rec.decision = "https", host, port, "intercept"
        if rec.method == "CONNECT":
            return self._refusal(rec, 400, "CONNECT inside an intercepted connection is not "
                                 "supported", client_error="malformed", close=True)
        origin = target
        absolute = is_absolute(target)
        if absolute:
            try:
                scheme, t_host, t_port, origin = parse_absolute(target)
            except TargetError as exc:
                return self._refusal(rec, 400, f"bad request target: {exc}",
                                     client_error="bad_target")
            if (scheme, t_host, t_port) != ("https", host, port):
                return self._misdirected(rec, target)
        elif target == "*" and rec.method == "OPTIONS":
            # asks about the server, not a resource: there is no URL to forward (it would
            # become https://host*), and the gateway is the server this connection talks to
            rec.path = "*"
            return Reply(Response(200, CIMultiDict(
                {"Allow": "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"}), EmptyBody()))
        elif not target.startswith("/"):
            return self._refusal(rec, 400, f"bad request target {target[:200]!r}",
                                 client_error="bad_target")
        rec.path = origin.split("?", 1)[0]
        host_header = headers.host
        if host_header is not None and host_header != self._host_ok and not absolute:
            try:
                h_host, h_port = parse_authority(host_header, 443)
            except TargetError:
                return self._refusal(rec, 400, f"bad Host header {host_header[:200]!r}",
                                     client_error="bad_target")
            if (h_host, h_port) != (host, port):
                return self._misdirected(rec, host_header)
            self._host_ok = host_header          # the same Host on every request: check once
        return self._build_exchange(request, rec, "https", host, port, origin, headers)

    def _misdirected(self, rec: AccessRecord, what: str) -> Reply:
        here = authority(self.tls_host or "", self.tls_port, "https")
        return self._refusal(
            rec, 421, f"this connection was opened with CONNECT {here}; it cannot carry requests "
            f"for {what[:200]}", reason=f"Misdirected Request: connection is for {here}",
            client_error="misdirected")

    def _build_exchange(self, request: http1.RequestHead, rec: AccessRecord, scheme: str,
                        host: str, port: int, origin: str, headers: RequestFields) -> Routed:
        # end-to-end headers, then Host and Via; RFC 9112 §3.2.2: the target's authority wins
        # over the client's Host
        ex_headers = headers.forward
        ex_headers["Host"] = authority(host, port, scheme)
        via = ", ".join(headers.vias)
        version = request.http_version
        ex_headers["Via"] = (via + ", " if via else "") + f"{version} {self.settings.via_pseudonym}"
        chunked = headers.chunked
        clen = headers.content_length
        if chunked and clen is not None:
            # RFC 9112 §6.3: both framings at once is a request-smuggling pattern (llhttp
            # already refuses it; kept as a second line)
            return self._refusal(rec, 400, "Content-Length together with Transfer-Encoding "
                                 "is not accepted", client_error="malformed")
        has_body = chunked or (clen is not None and clen.strip() not in ("", "0"))
        body_iter = RequestBody(self, rec) if has_body else None
        exchange = Exchange(method=rec.method, scheme=scheme, host=host, port=port, target=origin,
                            headers=ex_headers, body=body_iter, client=self.client, id=rec.id)
        exchange.notes["decision"] = rec.decision
        rec.exchange = exchange
        return exchange
