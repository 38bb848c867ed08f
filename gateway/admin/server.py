"""aiohttp application for the admin port.

Endpoints (GET and HEAD):

``/metrics``     Prometheus exposition of ``metrics.registry`` (OpenMetrics when asked for)
``/healthz``     200 ``ok`` as long as the process answers (liveness)
``/readyz``      200 when ``ready()`` is true, else 503 (fails while draining; readiness). Ready
                 is not "upstreams healthy": that is ``health`` in /api/status (gateway.health)
``/ca.pem``      the gateway CA certificate, as a download
``/api/status``  ``status()`` as JSON
``/``            the HTML status page (:mod:`gateway.admin.page`)

The callables are invoked per request; they may also return awaitables. A callable that raises
never takes the admin server down: the endpoint answers 503/500 with a short reason instead.

With a ``token`` (``server.admin_token_file`` / ``TRIVY_GATEWAY_ADMIN_TOKEN``), ``/metrics``,
``/api/status`` and ``/`` need ``Authorization: Bearer <token>`` (Prometheus
``authorization.credentials_file``); a browser may send it as the password of Basic auth (any
user name), so a person can open the page. Probes and scanners keep ``/healthz``, ``/readyz``
and ``/ca.pem`` without credentials.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import inspect
import json
import math
from typing import Any, Awaitable, Callable, Optional, Union

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from ..observability.logging import get_logger
from ..observability.metrics import Metrics
from .page import render_status_page

log = get_logger("gateway.admin")

#: paths that show traffic, hosts and configuration; the rest must stay open for probes
PROTECTED_PATHS = frozenset({"/", "/metrics", "/api/status"})

StatusFn = Callable[[], Union[dict, Awaitable[dict]]]
ReadyFn = Callable[[], Union[bool, Awaitable[bool]]]
CaFn = Callable[[], Union[bytes, Awaitable[bytes]]]

#: sent with every answer: the admin port is read-only and never needs scripts or framing
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}
PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


async def _call(fn: Callable[[], Any]) -> Any:
    value = fn()
    if inspect.isawaitable(value):
        value = await value
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity; replace them with null so every client can parse the answer."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class AdminServer:
    def __init__(self, metrics: Metrics, status: StatusFn, ready: ReadyFn, ca_pem: CaFn,
                 host: str = "0.0.0.0", port: int = 9128, *, refresh_seconds: int = 10,
                 token: str = ""):
        self.metrics = metrics
        self._token = token.encode("utf-8")
        self._status = status
        self._ready = ready
        self._ca_pem = ca_pem
        self.host = host
        self._requested_port = port
        self.refresh_seconds = refresh_seconds
        self._runner: Optional[web.AppRunner] = None
        self._port: Optional[int] = None
        self.app = self._build_app()

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for); the requested one before start."""
        return self._port if self._port is not None else self._requested_port

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host or None, self._requested_port,
                           reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        for addr in runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                self._port = int(addr[1])
                break
        log.info("admin_listening", address=f"{self.host}:{self.port}",
                 token_required=bool(self._token))

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> "AdminServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- application ----------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers_middleware])
        app.router.add_get("/", self.handle_page)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/readyz", self.handle_readyz)
        app.router.add_get("/ca.pem", self.handle_ca)
        app.router.add_get("/api/status", self.handle_status)
        return app

    def _authorized(self, request: web.Request) -> bool:
        if not self._token or request.path not in PROTECTED_PATHS:
            return True
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        offered = b""
        if scheme.lower() == "bearer":
            offered = value.strip().encode("utf-8")
        elif scheme.lower() == "basic":
            try:
                offered = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                offered = b""
        return hmac.compare_digest(offered, self._token)

    @web.middleware
    async def _headers_middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            if not self._authorized(request):
                # Bearer for Prometheus and scripts; Basic lets a browser prompt for the token
                raise web.HTTPUnauthorized(
                    text="this admin endpoint needs the admin token (Authorization: Bearer …)\n",
                    headers={"WWW-Authenticate": 'Bearer realm="trivy-gateway admin", '
                                                 'Basic realm="trivy-gateway admin"'})
            response = await handler(request)
        except web.HTTPException as exc:  # 404/405 from the router
            for key, value in SECURITY_HEADERS.items():
                exc.headers.setdefault(key, value)
            raise
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def handle_readyz(self, request: web.Request) -> web.Response:
        try:
            ready = bool(await _call(self._ready))
            reason = "not ready (draining or starting)"
        except Exception as exc:  # noqa: BLE001 - a failing probe means not ready
            log.warning("admin_ready_failed", error=repr(exc))
            ready, reason = False, f"not ready: {type(exc).__name__}"
        if ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=reason + "\n")

    async def handle_metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def handle_ca(self, request: web.Request) -> web.Response:
        try:
            pem = await _call(self._ca_pem)
        except Exception as exc:  # noqa: BLE001
            log.warning("admin_ca_failed", error=repr(exc))
            pem = b""
        if isinstance(pem, str):
            pem = pem.encode("ascii")
        if not pem:
            return web.Response(status=503, text="the gateway CA is not available yet\n")
        return web.Response(body=pem, headers={
            "Content-Type": "application/x-pem-file",
            "Content-Disposition": 'attachment; filename="trivy-gateway-ca.pem"',
        })

    async def _status_or_error(self) -> tuple[dict, str]:
        try:
            status = await _call(self._status)
        except Exception as exc:  # noqa: BLE001
            log.exception("admin_status_failed")
            return {}, f"{type(exc).__name__}: {exc}"
        if not isinstance(status, dict):
            return {}, f"status() returned {type(status).__name__}, not a dict"
        return status, ""

    async def handle_status(self, request: web.Request) -> web.Response:
        status, error = await self._status_or_error()
        if error:
            return web.json_response({"error": error}, status=500)
        text = json.dumps(_finite(status), default=_json_default, allow_nan=False)
        return web.Response(text=text, content_type="application/json")

    async def handle_page(self, request: web.Request) -> web.Response:
        status, error = await self._status_or_error()
        page = render_status_page(status, refresh_seconds=self.refresh_seconds, error=error)
        return web.Response(text=page, content_type="text/html", charset="utf-8",
                            status=200, headers={"Content-Security-Policy": PAGE_CSP})
