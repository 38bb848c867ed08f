"""The mirror door's request handling: a :class:`~.routes.Route` → an
:class:`~gateway.exchange.Exchange` for the same :class:`~gateway.pipeline.Pipeline` the proxy
door uses → a response in the protocol the scanner speaks.

Why answers are rewritten on the way out: Trivy falls through to its next repository only on
429, 5xx or ``BLOB_UNKNOWN``; any other failure (a 401, a 502 the gateway made up) would stop
the scan. So whatever the cache cannot absorb leaves this door as 429 (upstream throttling) or
503, in OCI error JSON, with ``Retry-After`` when known.
"""
from __future__ import annotations

import dataclasses

import hashlib
import json
import re
from typing import Callable, Optional
from urllib.parse import urlsplit

from multidict import CIMultiDict

from ..exchange import BytesBody, EmptyBody, Exchange, Handler, Response
from ..hostport import split_authority
from ..observability.logging import get_logger
from ..settings import Settings
from .routes import (WELL_KNOWN, Protocol, Route, RouteError, RouteKind, archive_path,
                     split_location)

log = get_logger("gateway.mirror")

#: client request fields that travel into the exchange; everything else (Authorization above
#: all: the door is anonymous, the gateway fetches with its own credentials) stays behind
_PASSED = ("accept", "range", "if-range", "if-none-match", "if-modified-since", "user-agent")
#: upstream response fields that make no sense coming from the mirror
_DROPPED = ("www-authenticate", "set-cookie", "location", "x-ratelimit-limit",
            "x-ratelimit-remaining", "x-ratelimit-reset", "x-ratelimit-used",
            "x-ratelimit-resource")
#: the largest VEX repository manifest the door reads (the real one is under 1 KiB)
VEX_MANIFEST_LIMIT = 256 * 1024
_AUTHORITY = re.compile(r"^[A-Za-z0-9.-]+(?::\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](?::\d{1,5})?$")
_REDIRECTS = (301, 302, 303, 307, 308)
#: told every exchange the door sends into the pipeline (the access log record follows it)
Seen = Callable[[Exchange], None]


def oci_error(status: int, code: str, message: str,
              headers: Optional[dict[str, str]] = None) -> Response:
    """An OCI distribution error body (Trivy prints ``code`` and ``message``)."""
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    h = CIMultiDict({"Content-Type": "application/json", "Cache-Control": "no-store",
                     "Docker-Distribution-API-Version": "registry/2.0"})
    h.update(headers or {})
    return Response(status, h, BytesBody(body))


def plain_error(status: int, message: str, headers: Optional[dict[str, str]] = None) -> Response:
    h = CIMultiDict({"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"})
    h.update(headers or {})
    return Response(status, h, BytesBody(f"trivy-gateway mirror: {message}\n".encode()))


def refusal(err: RouteError) -> Response:
    if err.protocol is Protocol.OCI:
        return oci_error(err.status, err.code, err.message)
    return plain_error(err.status, err.message)


class MirrorDoor:
    """Answers routed mirror requests through ``handler`` (the pipeline)."""

    def __init__(self, settings: Settings, handler: Handler, *, tls: bool) -> None:
        self.settings = settings
        self.handler = handler
        #: the pipeline's synchronous answer (a fresh hit in memory), when it has one
        self._try_hit: Optional[Callable[[Exchange], Optional[Response]]] = getattr(
            handler, "try_hit", None)
        self.scheme = "https" if tls else "http"

    def try_answer(self, rt: Route, method: str, headers: CIMultiDict, client: str,
                   request_id: str, seen: Seen) -> Optional[Response]:
        """:meth:`answer` when it is known without awaiting (the ping; a fresh hit the pipeline
        holds in memory), else None — then :meth:`answer` gives it. Why: the connection writes
        such an answer in its protocol callback (``docs/hit-path.md``)."""
        if rt.kind is RouteKind.OCI_PING:
            return _ping(method)
        if rt.kind is not RouteKind.OCI and rt.kind is not RouteKind.MAVEN:
            return None                          # VEX: the manifest is parsed (awaits)
        if self._try_hit is None:
            return None
        response = self._try_hit(self._exchange(method, rt.host, rt.target, headers, client,
                                                request_id, seen))
        if response is None:
            return None
        return self._outbound(response, Protocol.OCI if rt.kind is RouteKind.OCI
                              else Protocol.PLAIN)

    async def answer(self, rt: Route, method: str, headers: CIMultiDict, client: str,
                     request_id: str, seen: Seen) -> Response:
        if rt.kind is RouteKind.OCI_PING:
            return _ping(method)
        if rt.kind is RouteKind.VEX_MANIFEST:
            return await self._vex_manifest(rt, method, headers, client, request_id, seen)
        if rt.kind is RouteKind.VEX_ARCHIVE:
            return await self._vex_archive(rt, method, headers, client, request_id, seen)
        response = await self._fetch(method, rt.host, rt.target, headers, client, request_id,
                                     seen)
        return self._outbound(response, Protocol.OCI if rt.kind is RouteKind.OCI
                              else Protocol.PLAIN)

    # -- the seam: one exchange into the pipeline --------------------------------------------
    async def _fetch(self, method: str, host: str, target: str, headers: CIMultiDict,
                     client: str, request_id: str, seen: Seen) -> Response:
        return await self.handler.handle(self._exchange(method, host, target, headers, client,
                                                        request_id, seen))

    def _exchange(self, method: str, host: str, target: str, headers: CIMultiDict,
                  client: str, request_id: str, seen: Seen) -> Exchange:
        ex_headers = CIMultiDict((k, v) for k, v in headers.items() if k.lower() in _PASSED)
        ex_headers["Host"] = host
        hostname, port = split_authority(host)
        ex = Exchange(method=method, scheme="https", host=hostname, port=port or 443,
                      target=target,
                      headers=ex_headers, client=client, id=request_id)
        ex.notes["decision"] = "mirror"
        ex.notes["door"] = "mirror"
        seen(ex)
        return ex

    def _outbound(self, response: Response, protocol: Protocol) -> Response:
        """Upstream failures → 429/503 (so the scanner's own fallback runs); drop fields that
        only meant something between the gateway and the upstream."""
        status = response.status
        if status == 429 or status >= 500 or status in (401, 403, 407) or status in _REDIRECTS:
            # a redirect cannot be passed on: the scanner has no route to where it points
            retry = response.headers.get("Retry-After")
            extra = {"Retry-After": retry} if retry else {}
            cache = response.headers.get("Cache-Status")
            if cache:
                extra["Cache-Status"] = cache
            code, out = ("TOOMANYREQUESTS", 429) if status == 429 else ("UNAVAILABLE", 503)
            message = (f"the upstream answered {status} and the cache holds no usable copy; "
                       "try the next mirror or retry later")
            return (oci_error(out, code, message, extra) if protocol is Protocol.OCI
                    else plain_error(out, message, extra))
        if any(k in response.headers for k in _DROPPED):
            headers = CIMultiDict((k, v) for k, v in response.headers.items()
                                  if k.lower() not in _DROPPED)
            # a new answer: the pipeline's may be shared by other requests (never changed)
            return dataclasses.replace(response, headers=headers, head=None)
        return response

    # -- VEX repository ----------------------------------------------------------------------
    async def _upstream_manifest(self, rt: Route, client: str, request_id: str,
                                 seen: Seen) -> dict | Response:
        """The upstream repository manifest (through the cache), parsed; or a refusal."""
        url = urlsplit(self.settings.mirror.vex[rt.vex_name])
        target = url.path + (f"?{url.query}" if url.query else "")
        response = await self._fetch("GET", url.hostname or "", target, CIMultiDict(), client,
                                     request_id, seen)
        try:
            if response.status != 200:
                status = 404 if response.status == 404 else 503
                return plain_error(status, f"the upstream VEX repository manifest answered "
                                   f"{response.status}", _retry_after(response))
            data = bytearray()
            async for chunk in response.body.chunks():
                data += chunk
                if len(data) > VEX_MANIFEST_LIMIT:
                    return plain_error(502, "the upstream VEX repository manifest is too large")
        finally:
            await response.body.close()
        try:
            doc = json.loads(bytes(data))
            versions = doc["versions"]
            if not isinstance(versions, list):
                raise TypeError("versions is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            return plain_error(502, f"the upstream VEX repository manifest is not valid: {exc}")
        return doc

    async def _vex_manifest(self, rt: Route, method: str, headers: CIMultiDict, client: str,
                            request_id: str, seen: Seen) -> Response:
        doc = await self._upstream_manifest(rt, client, request_id, seen)
        if isinstance(doc, Response):
            return doc
        host = headers.get("Host", "")
        if not _AUTHORITY.match(host):
            return plain_error(400, "a VEX repository request needs a valid Host header")
        base = f"{self.scheme}://{host}"
        for vi, version in enumerate(doc["versions"]):
            for li, location in enumerate(version.get("locations") or []):
                archive, subdir = split_location(str(location.get("url", "")))
                filename = urlsplit(archive).path.rsplit("/", 1)[-1]
                location["url"] = base + archive_path(rt.vex_name, vi, li, filename) + subdir
        body = (json.dumps(doc, indent=2) + "\n").encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        h = CIMultiDict({"Content-Type": "application/json", "ETag": etag,
                         "Cache-Control": "no-cache"})
        inm = headers.get("If-None-Match")
        if inm is not None and etag in [t.strip().removeprefix("W/") for t in inm.split(",")]:
            return Response(304, h, EmptyBody(), source="cache")
        if method == "HEAD":
            h["Content-Length"] = str(len(body))
            return Response(200, h, EmptyBody())
        return Response(200, h, BytesBody(body))

    async def _vex_archive(self, rt: Route, method: str, headers: CIMultiDict, client: str,
                           request_id: str, seen: Seen) -> Response:
        doc = await self._upstream_manifest(rt, client, request_id, seen)
        if isinstance(doc, Response):
            return doc
        vi, li = rt.vex_location
        try:
            url = str(doc["versions"][vi]["locations"][li]["url"])
        except (IndexError, KeyError, TypeError):
            return plain_error(404, f"the VEX repository {rt.vex_name} lists no archive "
                               f"{vi}/{li} (fetch {WELL_KNOWN} again)")
        url, _subdir = split_location(url)
        allowed = set(self.settings.cache.github.hosts)
        for _hop in range(4):
            parts = urlsplit(url)
            if parts.scheme != "https" or parts.hostname not in allowed or parts.port:
                return plain_error(502, f"VEX archive at {url[:200]} is outside "
                                   "cache.github.hosts; the mirror does not fetch it")
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            response = await self._fetch(method, parts.hostname, target, headers, client,
                                         request_id, seen)
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location:
                return self._outbound(response, Protocol.PLAIN)
            await response.body.close()
            url = location
        return plain_error(502, "too many redirects fetching the VEX archive")


def _ping(method: str) -> Response:
    h = CIMultiDict({"Content-Type": "application/json",
                     "Docker-Distribution-API-Version": "registry/2.0"})
    return Response(200, h, BytesBody(b"{}") if method == "GET" else EmptyBody())


def _retry_after(response: Response) -> dict[str, str]:
    value = response.headers.get("Retry-After")
    return {"Retry-After": value} if value else {}
