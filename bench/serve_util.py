"""Shared by the benchmark's helper servers: announce the bound port, run until SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import signal
from typing import Iterable

from aiohttp import web


async def serve_until_signal(runner: web.AppRunner, site: web.TCPSite,
                             extra_lines: Iterable[str] = ()) -> None:
    """Start ``site``, print ``PORT <n>`` (and ``extra_lines``) for the parent, wait for a signal."""
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"PORT {port}", flush=True)
    for line in extra_lines:
        print(line, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
