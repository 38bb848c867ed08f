"""Blind tunnels: a bounded bidirectional byte pipe, and a direct (no parent proxy) opener.

The pipe never holds more than one read (``chunk_size``) plus the transport's write buffer per
direction: every write is followed by ``drain()``, which waits while the receiving side is slow.
"""
from __future__ import annotations

import asyncio
import os
import socket
from typing import Awaitable, Callable, Optional

from ..policy import Policy
from ..upstream.types import UpstreamError

#: ``open_tunnel(host, port) -> (reader, writer)``; raises (UpstreamError/OSError) when it cannot
TunnelOpener = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
Resolver = Callable[[str, int], Awaitable[list[str]]]


class _Activity:
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = asyncio.get_running_loop().time()


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, counter, activity: _Activity,
                idle_timeout: float, chunk_size: int, counted: list, slot: int) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                data = await src.read(chunk_size)
        except TimeoutError:
            if loop.time() - activity.last >= idle_timeout:
                raise
            continue                      # the other direction is busy: not idle
        if not data:
            if dst.can_write_eof() and not dst.is_closing():
                try:
                    dst.write_eof()       # half-close: the peer may still answer
                except OSError:
                    pass
            return
        dst.write(data)
        counted[slot] += len(data)
        counter.inc(len(data))
        activity.last = loop.time()
        async with asyncio.timeout(idle_timeout):
            await dst.drain()


async def pipe(client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
               upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter], metrics,
               idle_timeout: float, chunk_size: int = 64 * 1024) -> tuple[int, int, Optional[str]]:
    """Relay until both sides are done; returns (bytes upstream, bytes downstream, error)."""
    counted = [0, 0]
    activity = _Activity()
    up = asyncio.ensure_future(_copy(client[0], upstream[1],
                                     metrics.tunnel_bytes.labels(direction="upstream"), activity,
                                     idle_timeout, chunk_size, counted, 0))
    down = asyncio.ensure_future(_copy(upstream[0], client[1],
                                       metrics.tunnel_bytes.labels(direction="downstream"),
                                       activity, idle_timeout, chunk_size, counted, 1))
    error: Optional[str] = None
    try:
        pending = {up, down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    error = "idle timeout" if isinstance(exc, TimeoutError) else \
                        (str(exc) or type(exc).__name__)
                    for other in pending:
                        other.cancel()
                    upstream[1].transport.abort()
                    client[1].transport.abort()
    finally:
        for task in (up, down):
            if not task.done():
                task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        for writer in (upstream[1], client[1]):
            if not writer.is_closing():
                writer.close()
    return counted[0], counted[1], error


async def _default_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.append(sockaddr[0])
    return seen


class DirectTunnelOpener:
    """Connects tunnels straight to the target (or its ``upstream.address_overrides`` entry),
    applying :meth:`Policy.address_allowed` to every address before connecting.

    A fallback for deployments without a parent proxy; the upstream layer may provide a richer
    opener (parent proxy, circuit breaker) with the same call signature. ``resolver`` maps
    (host, port) to IP address strings; the default is the system resolver.
    """

    def __init__(self, policy: Policy, settings, resolver: Optional[Resolver] = None) -> None:
        upstream = settings.upstream
        self.policy = policy
        self.overrides = dict(upstream.address_overrides)
        self.connect_timeout = float(upstream.connect_timeout)
        self.resolver = resolver or _default_resolver

    async def __call__(self, host: str, port: int):
        target_host, target_port = host, port
        override = self.overrides.get(host)
        if override:
            h, _, p = override.rpartition(":")
            target_host, target_port = h.strip("[]"), int(p)
        try:
            async with asyncio.timeout(self.connect_timeout):
                addresses = await self.resolver(target_host, target_port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError("connect", host, f"cannot resolve {target_host}: {exc}") from None
        refusal: Optional[str] = None
        last_error: Optional[BaseException] = None
        for address in addresses:
            reason = self.policy.address_allowed(host, address)
            if reason:
                refusal = refusal or reason
                continue
            try:
                async with asyncio.timeout(self.connect_timeout):
                    return await asyncio.open_connection(address, target_port)
            except (OSError, TimeoutError) as exc:
                last_error = exc
        if last_error is not None:
            errno = getattr(last_error, "errno", None)
            what = "timed out" if isinstance(last_error, TimeoutError) else \
                (os.strerror(errno) if errno else str(last_error))
            raise UpstreamError("timeout" if isinstance(last_error, TimeoutError) else "connect",
                                host, f"cannot connect to {host}:{port}: {what}",
                                status=504 if isinstance(last_error, TimeoutError) else 502)
        if refusal:
            raise UpstreamError("ssrf", host, refusal, status=403)
        raise UpstreamError("connect", host, f"{target_host} has no address")
