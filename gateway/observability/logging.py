"""structlog set-up: one JSON object per line on stderr (or readable console output).

Secrets never reach a log line: the settings objects mask them in ``repr``, and
:func:`redact_headers` is what every layer uses before logging headers.
"""
from __future__ import annotations

import logging
import sys
from typing import Iterable, Mapping

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
        logger_factory=structlog.PrintLoggerFactory(file=stream or _CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio log through stdlib logging; keep their warnings, drop their chatter.
    logging.basicConfig(level=max(level, logging.WARNING), stream=stream or _CurrentStderr(),
                        format="%(levelname)s %(name)s %(message)s")


def get_logger(name: str):
    return structlog.get_logger(name)
