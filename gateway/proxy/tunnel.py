"""Blind tunnels: a bounded bidirectional byte pipe. Tunnels are opened by the upstream layer
(``UpstreamClient.open_tunnel``: overrides, parent proxy, SSRF guard), handed in as a
:data:`TunnelOpener`.

The pipe never holds more than one read (``chunk_size``) plus the transport's write buffer per
direction: every write is followed by ``drain()``, which waits while the receiving side is slow.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Optional

#: ``open_tunnel(host, port) -> (reader, writer)``; raises (UpstreamError/OSError) when it cannot
TunnelOpener = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


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
