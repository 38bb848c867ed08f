"""Bodies cut mid-way are resumed with Range (and If-Range), bytes stay intact."""
from __future__ import annotations

import asyncio
import hashlib
import os
import re

import pytest
from aiohttp import web

from gateway.upstream import UpstreamError
from upstream_support import GET, pki, sample, upstream  # noqa: F401

BLOB = os.urandom(3 * 1024 * 1024 + 123)
DIGEST = hashlib.sha256(BLOB).hexdigest()
ETAG = f'"sha256:{DIGEST}"'
_RANGE = re.compile(r"bytes=(\d+)-$")


async def serve_blob(request: web.Request, *, cut_at: float | None, honour_range: bool = True,
                     etag: str = ETAG) -> web.StreamResponse:
    """200 (cut after ``cut_at`` of the body) or 206 for ``Range: bytes=N-``."""
    rng = request.headers.get("Range")
    start = 0
    if rng and honour_range:
        m = _RANGE.match(rng)
        if_range = request.headers.get("If-Range")
        if m and (if_range is None or if_range == etag):
            start = int(m.group(1))
    resp = web.StreamResponse(status=206 if start else 200)
    resp.headers["ETag"] = etag
    resp.headers["Content-Type"] = "application/octet-stream"
    resp.content_length = len(BLOB) - start
    if start:
        resp.headers["Content-Range"] = f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"
    await resp.prepare(request)
    end = len(BLOB) if cut_at is None else int(len(BLOB) * cut_at)
    pos = start
    while pos < end:
        n = min(64 * 1024, end - pos)
        await resp.write(BLOB[pos:pos + n])
        pos += n
    if cut_at is not None and end < len(BLOB):
        await asyncio.sleep(0.01)
        request.transport.abort()                       # connection reset mid-body
        return resp
    await resp.write_eof()
    return resp


async def digest_of(resp) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    async for chunk in resp.iter_chunks():
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


async def test_reset_at_60_percent_is_resumed_with_range(pki):
    async def handler(request, srv):
        first = "Range" not in request.headers
        return await serve_blob(request, cut_at=0.6 if first else None)

    async with upstream(pki, {"mirror.test": handler}) as (client, metrics, srv):
        resp = await client.request(GET(f"https://mirror.test/v2/db/blobs/sha256:{DIGEST}",
                                        resumable=True))
        assert resp.status == 200
        digest, n = await digest_of(resp)
        assert (digest, n) == (DIGEST, len(BLOB))
        assert srv.count == 2
        second = srv.log[1].headers
        reached = int(_RANGE.match(second["Range"]).group(1))
        assert reached == int(len(BLOB) * 0.6)          # resumed from the byte reached
        assert second["If-Range"] == ETAG
        assert sample(metrics, "trivy_gateway_upstream_resumed_downloads_total",
                      host="mirror.test") == 1
        assert client.health()["mirror.test"]["in_flight"] == 0


async def test_not_resumable_raises_body_error(pki):
    async def handler(request, srv):
        return await serve_blob(request, cut_at=0.6)

    async with upstream(pki, {"mirror.test": handler}) as (client, _, srv):
        resp = await client.request(GET("https://mirror.test/blob"))   # resumable=False
        with pytest.raises(UpstreamError) as ei:
            await digest_of(resp)
        assert ei.value.reason == "body"
        assert srv.count == 1
        assert client.health()["mirror.test"]["in_flight"] == 0


async def test_resume_answered_200_is_refused(pki):
    async def handler(request, srv):
        return await serve_blob(request, cut_at=0.6, honour_range=False)

    async with upstream(pki, {"mirror.test": handler}) as (client, _, srv):
        resp = await client.request(GET("https://mirror.test/blob", resumable=True))
        with pytest.raises(UpstreamError) as ei:
            await digest_of(resp)
        assert ei.value.reason == "body" and "200" in ei.value.message
        assert srv.count == 2


async def test_resume_attempts_are_bounded(pki):
    async def handler(request, srv):
        return await serve_blob(request, cut_at=0.5 if "Range" not in request.headers else 0.9)

    async with upstream(pki, {"mirror.test": handler},
                        retry=dict(resume_attempts=2)) as (client, metrics, srv):
        resp = await client.request(GET("https://mirror.test/blob", resumable=True))
        with pytest.raises(UpstreamError) as ei:
            await digest_of(resp)
        assert ei.value.reason == "body" and "2 resume(s)" in ei.value.message
        assert srv.count == 3
        assert sample(metrics, "trivy_gateway_upstream_resumed_downloads_total",
                      host="mirror.test") == 2


async def test_expired_signature_on_resume_reasks_the_registry(pki):
    """ghcr.io: 307 to a signed CDN URL; the body breaks; the signature has expired by the time
    of the Range request (403), so the blob is asked of the registry again, with Range."""

    async def registry(request, srv):
        srv.state["n"] = srv.state.get("n", 0) + 1
        assert request.headers.get("Authorization") == "Bearer client-token"
        return web.Response(status=307, headers={
            "Location": f"https://cdn.test/ghcr1/blobs/sha256:{DIGEST}?se=2026-11-22T07%3A54%3A29Z"
                        f"&sig=s{srv.state['n']}&sp=r"})

    async def cdn(request, srv):
        assert "Authorization" not in request.headers
        sig = request.query["sig"]
        if sig == "s1" and "Range" not in request.headers:
            return await serve_blob(request, cut_at=0.6)
        if sig == "s1":
            return web.Response(status=403, text="Signed expiry time has passed")
        return await serve_blob(request, cut_at=None)

    async with upstream(pki, {"ghcr.test": registry, "cdn.test": cdn}) as rig:
        client, metrics = rig.client, rig.metrics
        reg, cdn_srv = rig.servers.values()
        resp = await client.request(GET(
            f"https://ghcr.test/v2/aquasecurity/trivy-db/blobs/sha256:{DIGEST}",
            headers={"Authorization": "Bearer client-token"}, follow_redirects=True,
            resumable=True))
        assert resp.status == 200 and resp.history[0][0] == 307
        assert "%3A" in cdn_srv.log[0].path_qs           # signed query passed verbatim
        digest, n = await digest_of(resp)
        assert (digest, n) == (DIGEST, len(BLOB))
        assert reg.count == 2                            # the origin was asked again
        assert "Range" in reg.log[1].headers
        reached = int(len(BLOB) * 0.6)
        assert [s.headers.get("Range") for s in cdn_srv.log] == [
            None, f"bytes={reached}-", f"bytes={reached}-"]
        assert [s.path_qs.split("sig=")[1][:2] for s in cdn_srv.log] == ["s1", "s1", "s2"]
        assert sample(metrics, "trivy_gateway_upstream_resumed_downloads_total",
                      host="cdn.test") == 1
