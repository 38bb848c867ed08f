"""Following redirects: hop by hop, credentials dropped when the host changes, no downgrade.

* 301/302/303/307/308 with a ``Location`` are followed when the request asks for it (at most
  :data:`MAX_REDIRECTS`); ``UpstreamResponse.history`` records the hops.
* ``Authorization`` and ``Cookie`` are dropped when a redirect leaves the host; configured
  credentials are only ever injected for the exact host they belong to (``hop.py``).
* A redirect from https to plain http is refused (:attr:`Reason.INSECURE_REDIRECT`): following
  it would send the client's or the gateway's credentials in cleartext, and hand content an
  on-path attacker can change to a cache that serves it as the https answer.
* 307/308 with a streamed request body go back to the caller (the body cannot be sent twice).
* A redirect *target* on another host answering 401/403/404/410 — typically a signed CDN URL
  whose signature expired on the way (ghcr.io → pkg-containers) — makes the origin be asked once
  more for a fresh URL.
"""
from __future__ import annotations

from typing import AsyncIterable, Awaitable, Optional, Protocol

from multidict import CIMultiDict
from yarl import URL

from ..hostport import url_authority
from ..observability.logging import get_logger
from .response import ResumeContext, StreamedResponse, safe_url
from .resume import REASK_STATUSES
from .types import Reason, UpstreamError, UpstreamRequest

log = get_logger("gateway.upstream")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5


class Send(Protocol):
    def __call__(self, method: str, url: URL, headers: CIMultiDict,
                 body: Optional[AsyncIterable[bytes]], deadline: float, *, kind: str = ...,
                 inject: bool = ...) -> Awaitable[StreamedResponse]: ...


def _host(url: URL) -> str:
    """The origin a hop goes to: ``host[:port]`` (another port is another origin)."""
    return url_authority(url)


async def follow(send: Send, req: UpstreamRequest, headers: CIMultiDict, deadline: float, *,
                 inject: bool = True) -> StreamedResponse:
    """Send ``req`` (with ``headers``), following redirects if it asks for it."""
    url = URL(req.url, encoded=True)
    if url.scheme not in ("http", "https") or not url.host:
        raise UpstreamError(Reason.PROTOCOL, url.host or "", f"unsupported URL {safe_url(url)}",
                            status=502)
    method = req.method.upper()
    body = req.body
    history: list[tuple[int, str]] = []
    origin_url, origin_headers, origin_method = url, headers, method
    reasked = False
    while True:
        resp = await send(method, url, headers, body, deadline, kind=req.kind, inject=inject)
        location = resp.headers.get("Location")
        if (history and not reasked and resp.status in REASK_STATUSES and body is None
                and _host(url) != _host(origin_url)):
            reasked = True
            log.info("upstream_reask_origin", host=url.host, status=resp.status,
                     origin=safe_url(origin_url))
            await resp.release()
            url, headers, method = origin_url, origin_headers, origin_method
            history.clear()
            continue
        if not (req.follow_redirects and resp.status in REDIRECT_STATUSES and location):
            break
        if len(history) >= MAX_REDIRECTS:
            await resp.release()
            raise UpstreamError(Reason.PROTOCOL, url.host or "",
                                f"more than {MAX_REDIRECTS} redirects from {safe_url(req.url)}",
                                status=502)
        try:
            new = url.join(URL(location, encoded=True))
        except ValueError:
            break
        if new.scheme not in ("http", "https") or not new.host:
            break
        if url.scheme == "https" and new.scheme == "http":
            await resp.release()
            raise UpstreamError(
                Reason.INSECURE_REDIRECT, url.host or "",
                f"{safe_url(url)} redirected to plain http ({safe_url(new)}); the gateway "
                "does not follow a redirect from https to http", status=502)
        if resp.status in (307, 308) and body is not None:
            break  # a streamed body cannot be sent twice: hand the redirect to the caller
        await resp.release()
        history.append((resp.status, location))
        if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
            method = "HEAD" if method == "HEAD" else "GET"
            body = None
        if _host(new) != _host(url):
            headers = CIMultiDict(headers)
            headers.popall("Authorization", None)
            headers.popall("Cookie", None)
        log.debug("redirect", status=resp.status, from_url=safe_url(url), to_url=safe_url(new))
        url = new
    resp.history = tuple(history)
    if req.resumable and method == "GET" and resp.status == 200 and resp.live is not None:
        resp.resume = resume_context(req, resp)
    return resp


def resume_context(req: UpstreamRequest, resp: StreamedResponse) -> Optional[ResumeContext]:
    """What a Range resume of ``resp`` needs; None when it cannot be resumed safely (neither a
    length to reach nor a validator to pin the content)."""
    length = resp.headers.get("Content-Length")
    etag = resp.headers.get("ETag")
    validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
    expected = int(length) if length and length.isdigit() else None
    if expected is None and not validator:
        return None
    return ResumeContext(req, expected, validator)
