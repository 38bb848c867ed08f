"""Continue a body cut mid-way with ``Range`` from the byte reached (bounded tries).

The resumed request goes to the URL that was answering (a signed CDN URL after a redirect); if
that URL refuses (401/403/404/410: the signature expired on the way), the original URL is asked
again for a fresh one. The 206 must start exactly at the byte reached and agree with the total the
first answer promised; anything else fails the body (the caller verifies digests anyway).
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from typing import Awaitable, Callable, Optional

from multidict import CIMultiDict
from yarl import URL

from ..observability.logging import get_logger
from ..observability.metrics import Metrics
from ..settings import RetrySettings
from .failure import client_body_error, describe
from .response import StreamedResponse, safe_url
from .types import Reason, UpstreamError, UpstreamRequest, UpstreamResponse

log = get_logger("gateway.upstream")

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
#: the URL that was answering refuses: ask the origin again (a signed URL expired)
REASK_STATUSES = frozenset({401, 403, 404, 410})

#: ``send_get(url, headers, deadline, kind)``: one hop, no injected credentials
SendGet = Callable[[URL, CIMultiDict, float, str], Awaitable[StreamedResponse]]
#: a whole request (redirects followed), for asking the origin again
Request = Callable[[UpstreamRequest], Awaitable[UpstreamResponse]]


def check_partial(new: UpstreamResponse, reached: int, expected: Optional[int]
                  ) -> tuple[bool, str]:
    """Whether ``new`` continues the body exactly at ``reached``; else why not."""
    if new.status == 200:
        return False, "the upstream answered 200 (whole body, Range ignored or validator changed)"
    if new.status != 206:
        return False, f"the upstream answered {new.status} to the Range request"
    m = _CONTENT_RANGE.match(new.headers.get("Content-Range", ""))
    if not m:
        return False, f"206 without a usable Content-Range ({new.headers.get('Content-Range')!r})"
    start, total = int(m.group(1)), m.group(3)
    if start != reached:
        return False, f"206 starts at byte {start}, expected {reached}"
    if expected is not None and total != "*" and int(total) != expected:
        return False, f"206 says total {total} bytes, the original said {expected}"
    return True, ""


def _with_range(headers: CIMultiDict, extra: CIMultiDict) -> CIMultiDict:
    out = CIMultiDict(headers)
    for k in ("Range", "If-Range"):
        out.popall(k, None)
    out.extend(extra)
    return out


class BodyResumer:
    """The :data:`~gateway.upstream.response.Resumer` of the client's responses."""

    def __init__(self, retry: RetrySettings, metrics: Metrics, send_get: SendGet,
                 request: Request) -> None:
        self.retry = retry
        self._metrics = metrics
        self._send_get = send_get
        self._request = request

    async def __call__(self, r: StreamedResponse, exc: BaseException) -> None:
        """Continue ``r``'s broken body in place, or raise :class:`UpstreamError`."""
        st = r.host_state
        host, reached, ctx = st.host, r.reached, r.resume
        what = describe(exc)
        if client_body_error(exc) is not None:
            r.drop_connection(reuse=False)
            raise UpstreamError(Reason.CLIENT_BODY, host, f"the client's request body failed "
                                f"while {safe_url(r.url)} was answering", status=400) from None
        if ctx is None or r.resumes >= self.retry.resume_attempts:
            r.drop_connection(reuse=False)
            why = "not resumable" if ctx is None else f"{r.resumes} resume(s) already tried"
            raise UpstreamError(Reason.BODY, host, f"body of {safe_url(r.url)} broke after "
                                f"{reached} bytes ({what}); {why}", status=502) from None
        r.resumes += 1
        st.resumes += 1
        self._metrics.resumed_downloads.labels(host=st.label).inc()
        self._metrics.upstream_retries.labels(host=st.label, reason="body").inc()
        log.warning("upstream_resume", host=host, url=safe_url(r.url), reached=reached,
                    expected=ctx.expected, attempt=r.resumes, error=what)
        r.drop_connection(reuse=False)
        deadline = asyncio.get_running_loop().time() + float(self.retry.deadline)
        origin = ctx.origin
        extra = CIMultiDict({"Range": f"bytes={reached}-"})
        if ctx.validator:
            extra["If-Range"] = ctx.validator
        final, origin_url = r.yurl, URL(origin.url, encoded=True)
        try:
            new: UpstreamResponse = await self._send_get(
                final, _with_range(r.hop_headers, extra), deadline, origin.kind)
            if new.status in REASK_STATUSES and final != origin_url:
                # e.g. the signed CDN URL expired: ask the origin again for a fresh one
                log.info("upstream_resume_from_origin", host=host, status=new.status,
                         origin=safe_url(origin_url))
                await new.release()
                again = replace(origin, headers=_with_range(origin.headers, extra),
                                follow_redirects=True, deadline=deadline, resumable=False)
                new = await self._request(again)
        except UpstreamError as err:
            raise UpstreamError(Reason.BODY, err.host, f"resuming {safe_url(r.url)} at byte "
                                f"{reached} failed: {err.message}", status=502) from None
        ok, why = check_partial(new, reached, ctx.expected)
        if not ok:
            await new.release()
            raise UpstreamError(Reason.BODY, host, f"cannot resume {safe_url(r.url)} at byte "
                                f"{reached}: {why}", status=502)
        assert isinstance(new, StreamedResponse)
        r.adopt(new)
