"""The response :meth:`UpstreamClient.request` returns: a head plus a body stream.

The body is either live (aiohttp's stream, holding the host's limiter slot until it is consumed
or released) or, for small error bodies read while deciding about retries, all in memory. A body
cut mid-way is handed to a *resumer* (``resume.py``), which continues it with ``Range`` and lets
this response :meth:`adopt` the new stream; the caller sees one uninterrupted body.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Optional

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from .types import Reason, UpstreamError, UpstreamRequest, UpstreamResponse

if TYPE_CHECKING:  # pragma: no cover
    from .hosts import HostState


def safe_url(url: URL | str) -> str:
    """URL for logs and messages: no query (signed CDN URLs carry signatures there)."""
    u = url if isinstance(url, URL) else URL(url, encoded=True)
    return str(u.with_query(None).with_fragment(None)) + ("?…" if u.raw_query_string else "")


@dataclass
class ResumeContext:
    """What resuming a cut body needs: the original request and what the first answer promised."""

    origin: UpstreamRequest
    #: Content-Length of the first answer (the body must reach it)
    expected: Optional[int]
    #: strong ETag or Last-Modified, sent as If-Range
    validator: Optional[str]


#: ``resumer(response, error)``: continue a broken body in place or raise UpstreamError
Resumer = Callable[["StreamedResponse", BaseException], Awaitable[None]]

#: errors that cut a body mid-way (resumable)
BODY_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError,
               ConnectionError)


class StreamedResponse(UpstreamResponse):
    """Head + body stream; the package-internal fields are plain attributes (no underscores) so
    the hop, redirect and resume code use them without reaching into privates."""

    def __init__(self, st: "HostState", resp: aiohttp.ClientResponse, url: URL,
                 hop_headers: CIMultiDict, resumer: Resumer, *, slot_held: bool = True) -> None:
        self.host_state = st
        self.live: Optional[aiohttp.ClientResponse] = resp
        self.slot_held = slot_held
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers = resp.headers
        self.url = str(url)
        self.yurl = url
        self.history: tuple[tuple[int, str], ...] = ()
        #: the headers this hop was sent with (a resume repeats them)
        self.hop_headers = hop_headers
        #: bytes read ahead (small error bodies); ``prefix_only``: they are the whole body
        self.prefix = b""
        self.prefix_only = False
        #: body bytes handed to the caller so far
        self.reached = 0
        self.complete = False
        self.resumes = 0
        #: set when the body may be resumed with Range
        self.resume: Optional[ResumeContext] = None
        self._resumer = resumer
        self._consumed = False

    # -- for the hop -------------------------------------------------------------------------
    async def buffer_small(self, limit: int, deadline: float) -> bool:
        """Read the body into memory if it is at most ``limit`` bytes; keep what was read."""
        assert self.live is not None
        buf = bytearray()
        try:
            async with asyncio.timeout_at(deadline):
                while len(buf) <= limit:
                    chunk = await self.live.content.readany()
                    if not chunk:
                        self.prefix = bytes(buf)
                        self.prefix_only = True
                        self.complete = True
                        self.drop_connection(reuse=True)
                        return True
                    buf.extend(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            self.prefix = bytes(buf)
            self.prefix_only = True  # what arrived is all there is
            self.drop_connection(reuse=False)
            return True
        self.prefix = bytes(buf)
        return False

    def drop_connection(self, reuse: bool) -> None:
        """Give the connection back (or close it) and the host's limiter slot."""
        if self.live is not None:
            if reuse:
                self.live.release()
            else:
                self.live.close()
            self.live = None
        if self.slot_held:
            self.slot_held = False
            self.host_state.limiter.release()

    def adopt(self, other: "StreamedResponse") -> None:
        """Take over the live body (and URL) of the response that resumed this one."""
        self.live, other.live = other.live, None
        self.slot_held, other.slot_held = other.slot_held, False
        self.host_state = other.host_state
        self.prefix, self.prefix_only = other.prefix, other.prefix_only
        self.complete = other.complete
        self.url, self.yurl, self.hop_headers = other.url, other.yurl, other.hop_headers

    # -- UpstreamResponse ----------------------------------------------------------------------
    async def iter_chunks(self) -> AsyncIterator[bytes]:
        if self._consumed:
            raise RuntimeError("the body of this response was already consumed")
        self._consumed = True
        expected = self.resume.expected if self.resume else None
        try:
            while True:
                if self.prefix:
                    data, self.prefix = self.prefix, b""
                    self.reached += len(data)
                    yield data
                if self.prefix_only or self.live is None:
                    break
                try:
                    chunk = await self.live.content.readany()
                    if not chunk and expected is not None and self.reached < expected:
                        raise aiohttp.ClientPayloadError(
                            f"body ended after {self.reached} of {expected} bytes")
                except BODY_ERRORS as exc:
                    await self._resumer(self, exc)
                    continue
                if not chunk:
                    self.complete = True
                    break
                self.reached += len(chunk)
                yield chunk
        finally:
            await self.release()

    async def read(self, limit: int = 16 * 1024 * 1024) -> bytes:
        out = bytearray()
        async for chunk in self.iter_chunks():
            out.extend(chunk)
            if len(out) > limit:
                await self.release()
                raise UpstreamError(Reason.BODY, self.host_state.host,
                                    f"body of {safe_url(self.url)} exceeds {limit} bytes",
                                    status=502)
        return bytes(out)

    async def release(self) -> None:
        self.drop_connection(reuse=self.complete)

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {safe_url(self.url)}>"

    def __del__(self) -> None:
        # safety net for a caller that neither consumed nor released the body: give the
        # host's concurrency slot back so the limiter cannot leak capacity
        if getattr(self, "slot_held", False):
            try:
                self.drop_connection(reuse=False)
            except Exception:  # noqa: BLE001 - interpreter shutdown, no loop
                pass
