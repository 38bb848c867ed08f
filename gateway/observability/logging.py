"""structlog set-up: one JSON object per line on stderr (or readable console output).

Secrets never reach a log line: the settings objects mask them in ``repr``, and
:func:`redact_headers` is what every layer uses before logging headers.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
from typing import Iterable, Mapping, Optional

import structlog

from ..settings import LoggingSettings

SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie",
                            "x-registry-auth", "private-token"})


def redact_headers(headers: Iterable[tuple[str, str]] | Mapping[str, str]) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {k: ("***" if k.lower() in SECRET_HEADERS else v) for k, v in items}


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is *now* (not the object it was at configuration time),
    so a replaced or closed stderr (test capture, daemonising) never breaks logging."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


#: how long a log line may wait in the buffer while the event loop is busy
FLUSH_DELAY = 0.02


class _LineBuffer:
    """Log lines for one output, written in batches: one ``write`` + ``flush`` per event-loop
    burst instead of one per line (the access log writes a line per request).

    A line logged on a thread running an event loop is written within :data:`FLUSH_DELAY` (a
    ``call_later`` on that loop); anywhere else (no loop, another thread) it is written at
    once, together with whatever is buffered, so lines stay in order. What is still buffered
    at interpreter exit is written by an ``atexit`` hook.
    """

    def __init__(self, file) -> None:
        self._file = file
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._armed: Optional[asyncio.AbstractEventLoop] = None
        atexit.register(self.flush)

    def write_line(self, line: str) -> None:
        loop = asyncio._get_running_loop()
        with self._lock:
            self._lines.append(line)
            if loop is None:
                self._write()
                return
            if self._armed is loop:
                return
            self._armed = loop
        loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        with self._lock:
            self._armed = None
            if self._lines:
                self._write()

    def _write(self) -> None:
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError):            # closed or broken stderr: drop, never raise
            pass


class _BufferedLogger:
    """structlog's PrintLogger interface (every level is ``msg``), writing via a _LineBuffer."""

    __slots__ = ("_buffer",)

    def __init__(self, buffer: _LineBuffer) -> None:
        self._buffer = buffer

    def msg(self, message: str) -> None:
        self._buffer.write_line(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _BufferedLoggerFactory:
    def __init__(self, file) -> None:
        self._logger = _BufferedLogger(_LineBuffer(file))

    def __call__(self, *args) -> _BufferedLogger:
        return self._logger


def configure_logging(settings: LoggingSettings, stream=None) -> None:
    level = getattr(logging, settings.level.upper())
    renderer = (structlog.processors.JSONRenderer() if settings.format == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_BufferedLoggerFactory(stream or _CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio log through stdlib logging; keep their warnings, drop their chatter.
    logging.basicConfig(level=max(level, logging.WARNING), stream=stream or _CurrentStderr(),
                        format="%(levelname)s %(name)s %(message)s")


def get_logger(name: str):
    return structlog.get_logger(name)
