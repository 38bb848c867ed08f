"""Giving freed heap memory back to the system after a wave of client connections closes.

Each client connection makes thousands of small allocations (OpenSSL's per-connection state is
~20 KiB of them) that interleave with longer-lived ones. When a few thousand connections close,
glibc keeps most of the freed memory: it only returns the top of the heap by itself, so a burst of
idle connections would leave its peak RSS behind for good. ``malloc_trim(0)`` also releases free
pages in the middle of the heap (``madvise``). It is called once after every
:data:`TRIM_AFTER_CLOSES` closed connections, a second later (a wave is usually still closing)
and in a worker thread (it walks the heap and takes malloc's lock, not the GIL). Not glibc
(musl, macOS): nothing to do.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from typing import Callable, Optional

#: closed connections between two trims
TRIM_AFTER_CLOSES = 256
#: wait this long after the threshold is reached (let the rest of the wave close first)
TRIM_DELAY = 1.0


def _load_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


class MemoryReleaser:
    """Counts closed connections and trims the heap after each :data:`TRIM_AFTER_CLOSES`."""

    def __init__(self, every: int = TRIM_AFTER_CLOSES, delay: float = TRIM_DELAY) -> None:
        self.every = every
        self.delay = delay
        self.trims = 0
        self._closed = 0
        self._pending: Optional[asyncio.TimerHandle] = None

    def connection_closed(self) -> None:
        self._closed += 1
        if self._closed >= self.every and self._pending is None and _malloc_trim is not None:
            loop = asyncio.get_running_loop()
            self._pending = loop.call_later(self.delay, self._trim, loop)

    def _trim(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending = None
        self._closed = 0
        self.trims += 1
        loop.run_in_executor(None, _malloc_trim, 0)

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
