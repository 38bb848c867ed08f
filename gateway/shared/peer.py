"""The peer endpoint: other replicas stream a fill in progress from the replica leading it.

``GET /peer/blob/<digest>`` serves a verified body from this replica's local tier, so a replica
without it (and without S3, or before the upload) reads it from a peer, not the upstream.

Like Dragonfly's seed peer, the replica that holds a fill's lease serves the bytes it has while
it is still downloading: ``GET /peer/fill/<sha256 of the cache key>?from=N`` answers the
leader's response head (status, stored headers, length) in ``X-Peer-*`` fields and the body from
byte N as it lands (chunked). The fill's last byte is released only after it verified, so a
peer never receives all of a body that fails its digest; if the fill fails, the connection is
aborted without the final chunk and the follower sees a broken body, never a complete one.

Replicas authenticate with the random token kept in Redis (``Authorization: Bearer …``): only
what can read the shared Redis can read fills (which may be content fetched with credentials).
It is its own listener (``cache.shared.peer_listen``), not the admin port, which is read-only
and often exposed to monitoring.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
from typing import Callable, Optional

from aiohttp import web

from ..cache import FillFailed
from ..observability.logging import get_logger
from ..settings import split_hostport

log = get_logger("gateway.shared")

#: how long the endpoint waits for a job's response head before answering 409
HEAD_WAIT = 60.0
READ_CHUNK = 256 * 1024


class PeerServer:
    def __init__(self, listen: str, jobs: Callable[[str], Optional[object]],
                 token: Callable[[], str], blobs) -> None:
        self.host, self.port = split_hostport(listen, "cache.shared.peer_listen")
        self._jobs = jobs
        self._token = token
        self._blobs = blobs
        self._runner: Optional[web.AppRunner] = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/peer/fill/{key_id}", self._fill)
        app.router.add_get("/peer/blob/{digest}", self._blob)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:  # an ephemeral port (workers without a configured peer port)
            self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        log.info("peer_endpoint_listening", listen=f"{self.host}:{self.port}")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _authorized(self, request: web.Request) -> bool:
        token = self._token()
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return bool(token) and hmac.compare_digest(given.encode(), token.encode())

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        """A verified body from this replica's local tier (another replica reads it through
        instead of asking the upstream; it verifies the digest again)."""
        if not self._authorized(request):
            return web.Response(status=401, text="peer token required")
        digest = request.match_info["digest"]
        try:
            path = self._blobs.pin(digest)
        except ValueError:
            return web.Response(status=400, text="bad digest")
        if path is None:
            return web.Response(status=404, text="not in this replica's local tier")
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            self._blobs.unpin(digest)
            return web.Response(status=404, text="not in this replica's local tier")
        try:
            size = os.fstat(fd).st_size
            resp = web.StreamResponse(status=200)
            resp.content_length = size
            await resp.prepare(request)
            pos = 0
            while pos < size:
                data = os.pread(fd, min(READ_CHUNK, size - pos), pos)
                if not data:
                    break
                pos += len(data)
                await resp.write(data)
            await resp.write_eof()
            return resp
        finally:
            os.close(fd)
            self._blobs.unpin(digest)

    async def _fill(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401, text="peer token required")
        job = self._jobs(request.match_info["key_id"])
        if job is None:
            return web.Response(status=404, text="no fill for this key here")
        try:
            outcome = await asyncio.wait_for(asyncio.shield(job.outcome), HEAD_WAIT)
        except asyncio.TimeoutError:
            return web.Response(status=409, text="no response head yet")
        fill = outcome.fill
        if outcome.kind != "fill" or fill is None:
            return web.Response(status=409, text=f"not a fill ({outcome.kind})")
        try:
            start = int(request.query.get("from", "0"))
        except ValueError:
            return web.Response(status=400, text="bad from")
        head = {"X-Peer-Status": str(outcome.status),
                "X-Peer-Headers": json.dumps(list(outcome.headers.items())),
                "X-Peer-Served-By": outcome.served_by or ""}
        if fill.expected_size is not None:
            head["X-Peer-Length"] = str(fill.expected_size)
        resp = web.StreamResponse(status=200, headers=head)
        reader = fill.follow(start)
        try:
            await resp.prepare(request)
            async for chunk in reader:
                await resp.write(chunk)
        except FillFailed as exc:
            # no final chunk: the follower must see a broken body, not a complete one
            log.warning("peer_fill_aborted", key_id=request.match_info["key_id"], error=str(exc))
            if request.transport is not None:
                request.transport.abort()
            return resp
        finally:
            await reader.aclose()
        await resp.write_eof()
        return resp
