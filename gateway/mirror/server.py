"""The mirror listener: the proxy's connection machinery (HTTP/1.1 state machine, timeouts,
keep-alive, drain, response writer with sendfile) with a different request dispatch.

A mirror connection never CONNECTs, never intercepts and takes only origin-form requests; each
one is routed (:mod:`.routes`), answered by :class:`~.door.MirrorDoor` through the shared
pipeline, and written by the proxy's :class:`~gateway.proxy.respond.ResponseWriter`.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Optional, Union

from ..exchange import Response, error_response
from ..observability.logging import get_logger
from ..proxy.connection import ClientConnection
from ..proxy.respond import Outcome
from ..proxy.routing import Prepared, Reply
from ..proxy.request import AccessRecord, RequestFields
from ..proxy.server import ProxyServer
from ..settings import Settings
from .door import MirrorDoor, refusal
from .routes import RouteError, route

log = get_logger("gateway.mirror")


class MirrorConnection(ClientConnection):
    """Routes origin-form requests to :class:`~.door.MirrorDoor`; the connection's two
    schedulers (callback mode for answers known at once, the task for the rest) are the
    proxy's."""

    server: "MirrorServer"
    first_kind = "mirror"

    def _prepare(self, request) -> Prepared:
        method, target = request.method, request.target
        rec = AccessRecord.of(self.client, method, self._loop.time(), door="mirror",
                              decision="mirror")
        rec.path = target.split("?", 1)[0][:200]
        headers = RequestFields(request.headers)
        clen = (headers.content_length or "").strip()
        if headers.chunked or clen not in ("", "0"):
            # nothing a read-only mirror is asked carries a body: refuse before reading it
            self.metrics.client_errors.labels(reason="malformed").inc()
            rec.error = "request with a body"
            return Prepared(rec, headers, Reply(error_response(
                400, "trivy-gateway mirror: requests with a body are not accepted"), close=True))
        try:
            rt = route(method, target, self.server.app_settings)
        except RouteError as err:
            rec.decision = "deny" if err.code == "NAME_UNKNOWN" else "none"
            rec.error = err.message
            return Prepared(rec, headers, Reply(refusal(err)))
        return Prepared(rec, headers, rt)

    def _door_args(self, prepared: Prepared) -> tuple:
        """``MirrorDoor.answer``'s arguments for a routed request."""
        rec, headers = prepared.rec, prepared.headers
        fwd = headers.forward
        if headers.host is not None:
            fwd["Host"] = headers.host

        def seen(exchange) -> None:              # the access log names the upstream URL
            rec.exchange = exchange
            rec.scheme, rec.host, rec.port = exchange.scheme, exchange.host, exchange.port

        return (prepared.routed, rec.method, fwd, self.client, rec.id, seen)

    def _known_answer(self, prepared: Prepared) -> Union[Reply, Response, None]:
        routed = prepared.routed
        if type(routed) is Reply:
            return routed
        prepared.tried = True
        try:
            response = self.server.door.try_answer(*self._door_args(prepared))
        except Exception:  # noqa: BLE001 - answer() gives the answer (and logs what fails)
            return None
        return response

    async def _answer_routed(self, request, prepared: Prepared,
                             response: Optional[Response]) -> Outcome:
        rec = prepared.rec
        if response is None:
            try:
                response = await self.server.door.answer(*self._door_args(prepared))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - answer, never drop the connection silently
                log.exception("mirror_failed", request_id=rec.id, path=rec.path)
                response = error_response(503, f"trivy-gateway mirror: internal error: {exc}")
        return await self._respond(rec, rec.method, response)


class MirrorServer(ProxyServer):
    """``MirrorServer(settings, policy, pipeline, metrics)`` on ``server.mirror_listen``."""

    connection_class = MirrorConnection
    door_name = "mirror"

    def __init__(self, settings: Settings, policy, handler, metrics, *,
                 listen: Optional[str] = None) -> None:
        super().__init__(settings, policy, None, handler, metrics,
                         listen=listen or settings.server.mirror_listen)
        self.app_settings = settings
        tls = settings.mirror.tls
        self.ssl_context = _server_context(tls.cert, tls.key) if tls.enabled else None
        self.door = MirrorDoor(settings, handler, tls=tls.enabled)


def _server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
