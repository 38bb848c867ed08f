"""structlog set-up: one JSON object per line on stderr (or readable console output).

Secrets never reach a log line: the settings objects mask them in ``repr``, and
:func:`redact_headers` is what every layer uses before logging headers.

The proxy writes one access-log line per request, so the processor chain is on the hot path of
every cache hit. Two of structlog's stock processors dominated it and are replaced here by
equivalents producing the same text (``bench/hitpath.py`` measures it):

- JSON: orjson instead of ``json.dumps`` (which builds a new ``JSONEncoder`` per call when given
  ``default=``); see :func:`_render_json` for how the output stays what it was.
- timestamp: :class:`_UtcIsoStamper` formats the date and time once per second instead of a
  ``datetime`` + ``isoformat()`` per line.

``cache_logger_on_first_use`` stays off: the access log is bound once per connection (not per
request), pipeline loggers are not called on a hit, and cached loggers would keep a level and
processor list across re-configuration (tests reconfigure and use ``capture_logs``).
"""
from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

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
#: lines written at once, without waiting for the timer, once this many are buffered: a burst's
#: batch stays small enough to be joined and written while in the CPU cache (joining thousands
#: of lines cost ~0.5 µs per line, batches of a few hundred ~0.15), and the memory it holds bounded
FLUSH_LINES = 256


class _LineBuffer:
    """Log lines for one output, written in batches: one ``write`` + ``flush`` per event-loop
    burst instead of one per line (the access log writes a line per request).

    A line logged on a thread running an event loop is written within :data:`FLUSH_DELAY` (a
    ``call_later`` on that loop), or at once with the batch when it is the
    :data:`FLUSH_LINES`-th buffered; anywhere else (no loop, another thread) it is written at
    once, together with whatever is buffered, so lines stay in order. What is still buffered
    at interpreter exit is written by an ``atexit`` hook.
    """

    def __init__(self, file) -> None:
        self._file = file
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._armed: Optional[asyncio.AbstractEventLoop] = None
        #: the thread that runs ``_armed``
        self._armed_thread = 0
        atexit.register(self.flush)

    def write_line(self, line: str) -> None:
        """Buffer a line (its text, without the newline)."""
        with self._lock:
            lines = self._lines
            lines.append(line)
            if len(lines) >= FLUSH_LINES:
                self._write()
                return
            armed = self._armed
            # a flush is due on the loop running in this thread (the common case, a line per
            # request): nothing more to do, and no asyncio._get_running_loop() (a getpid()
            # system call on every call, to detect a fork)
            if armed is not None and self._armed_thread == threading.get_ident() \
                    and armed.is_running():
                return
        loop = asyncio._get_running_loop()
        with self._lock:
            if loop is None:
                if self._lines:
                    self._write()
                return
            if self._armed is loop:
                return
            self._armed = loop
            self._armed_thread = threading.get_ident()
        loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        with self._lock:
            self._armed = None
            if self._lines:
                self._write()

    def _write(self) -> None:
        lines = self._lines
        lines.append("")                         # the last line's newline, without copying text
        text = "\n".join(lines)
        lines.clear()
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


#: orjson would serialise dataclasses and datetimes itself; the stock renderer passed them to
#: ``default`` (→ ``repr``), and the settings dataclasses rely on their ``repr`` to mask secrets.
#: Non-string keys are written as strings (json.dumps did the same for int/float/bool keys).
_ORJSON_OPTIONS = (orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
                   | orjson.OPT_NON_STR_KEYS)


def _json_default(obj: Any) -> Any:
    """What structlog's JSONRenderer does with a value JSON has no type for: its
    ``__structlog__()`` if it has one, else its ``repr`` (structlog also unwraps its deprecated
    thread-local context wrapper, which the gateway never uses)."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


def _render_json(event_dict: EventDict) -> str:
    """``JSONRenderer()``'s text, by orjson (``json.dumps`` built a new ``JSONEncoder`` per call
    when given ``default=``).

    Same keys, order and values as ``json.dumps``; the text differs only in whitespace (no
    space after ``,`` and ``:``), non-ASCII characters written as UTF-8 instead of ``\\uXXXX``
    escapes, and NaN/Infinity written as ``null`` (valid JSON). What orjson refuses (integers
    beyond 64 bits, nesting deeper than 254) falls back to ``json.dumps``: a log call never
    raises because of its values."""
    try:
        return orjson.dumps(event_dict, default=_json_default, option=_ORJSON_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(event_dict, default=_json_default)


def json_value(value: Any) -> str:
    """The JSON text :func:`_render_json` writes for ``value`` as a field's value."""
    try:
        return orjson.dumps(value, default=_json_default, option=_ORJSON_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, default=_json_default)


#: values a :class:`JsonRun` remembers the text of before it starts over
JSON_RUN_MAX = 4096


class JsonRun:
    """The JSON text of a fixed run of fields (``"a":1,"b":"x"``: an object's members, without
    the braces), remembered by their values.

    Why: most fields of an access line repeat from one request to the next (method, host, path,
    status, size, cache outcome), and making a line from remembered runs plus the few fields
    that change (id, client, duration, time) costs about half of rendering it whole
    (``bench/hitpath.py``). The text is :func:`_render_json`'s for those fields, so a line made
    of runs is the line rendered whole (``tests/test_logging.py`` checks this over random
    values). Values must be hashable, and one field's values of one type: ``1`` and ``True``
    are one key (the access line's fields are never both). Bounded: :data:`JSON_RUN_MAX`
    values, then it starts over."""

    __slots__ = ("names", "texts")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        #: values → text (read directly by callers that save a call: ``texts.get(v) or text(v)``)
        self.texts: dict[tuple, str] = {}

    def text(self, values: tuple) -> str:
        known = self.texts.get(values)
        if known is None:
            known = _render_json(dict(zip(self.names, values)))[1:-1]
            texts = self.texts
            if len(texts) >= JSON_RUN_MAX:
                texts.clear()
            texts[values] = known
        return known


class _JsonRenderer:
    """The renderer step: :func:`_render_json`."""

    __slots__ = ()

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        return _render_json(event_dict)


#: (second, "YYYY-mm-ddTHH:MM:SS") of the last timestamp (one tuple: consistent when read from
#: any thread)
_stamp_cache: tuple[int, str] = (-1, "")


def _utc_iso_now() -> str:
    """The text of ``TimeStamper(fmt="iso", utc=True)`` (``datetime.isoformat`` in UTC with
    ``Z``: microseconds, omitted when zero), with the date and time formatted once per second."""
    return _utc_iso(time.time_ns())


def _utc_iso(ns: int) -> str:
    """:func:`_utc_iso_now`'s text for the time ``ns`` (nanoseconds since the epoch)."""
    global _stamp_cache
    second = ns // 1_000_000_000
    cached_second, prefix = _stamp_cache
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp_cache = (second, prefix)
    micro = ns // 1000 % 1_000_000
    # str(1_000_000 + micro)[1:]: the six digits, zero-padded (cheaper than a format spec)
    return f"{prefix}.{str(1_000_000 + micro)[1:]}Z" if micro else prefix + "Z"


class _UtcIsoStamper:
    """The ``timestamp`` step: :func:`_utc_iso_now`."""

    __slots__ = ()

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        event_dict["timestamp"] = _utc_iso_now()
        return event_dict


#: the processors :func:`configure_logging` set up last, when they render JSON (else empty):
#: :class:`InfoLine` runs this chain as one function (same steps, same text)
_json_chain: tuple = ()


def configure_logging(settings: LoggingSettings, stream=None) -> None:
    global _json_chain
    level = getattr(logging, settings.level.upper())
    renderer = (_JsonRenderer() if settings.format == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _UtcIsoStamper(),
        structlog.processors.format_exc_info,
        renderer,
    ]
    _json_chain = tuple(processors) if settings.format == "json" else ()
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_BufferedLoggerFactory(stream or _CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio log through stdlib logging; keep their warnings, drop their chatter.
    logging.basicConfig(level=max(level, logging.WARNING), stream=stream or _CurrentStderr(),
                        format="%(levelname)s %(name)s %(message)s")


#: structlog's registry of the context variables ``bind_contextvars`` created (None: this
#: structlog keeps no such registry, so merge_contextvars always runs)
_structlog_context_vars: Optional[dict] = getattr(structlog.contextvars, "_CONTEXT_VARS", None)


_T = TypeVar("_T")

#: event → the text of an info line after its fields, up to its timestamp (:meth:`InfoLine.fields`)
_closings: dict[str, str] = {}


class InfoLine:
    """``bound.info(event, **fields)`` for a logger bound once and called per request (the
    access log), without structlog's per-call plumbing.

    The same processors (the chain the bound logger was created with), the same wrapped logger,
    the same text; what is skipped is the bound logger's generic path (method proxy, context
    copy and merge, result dispatch), about half the cost of a line (~4.4 → ~2.5 µs measured
    here). When that chain is the JSON chain :func:`configure_logging` set up (what the gateway
    runs), its steps are run inline (~3.0 → ~2.2 µs): the same processors called in the same
    order, minus the calls that cannot change anything for an ``info`` line without
    ``exc_info``. A chain that drops the event (:class:`structlog.DropEvent`, e.g.
    ``capture_logs`` in tests) drops it here too, and a level above ``info`` makes the call a
    no-op, as the filtering bound logger does. :meth:`fields` is the access log's form: where
    nothing is bound, the line is made from JSON members text the caller builds from
    remembered runs (:class:`JsonRun`), without a dict.
    """

    __slots__ = ("_context", "_processors", "_logger", "enabled", "_json", "_write", "_plain")

    def __init__(self, bound: Any) -> None:
        # structlog's BoundLoggerBase keeps these as attributes; fixed at bind time, like
        # the bound logger itself
        self._context = dict(bound._context)
        self._processors = tuple(bound._processors)
        self._logger = bound._logger
        self.enabled = bound.is_enabled_for(logging.INFO)
        #: this logger's chain is the JSON chain of configure_logging (see __call__)
        self._json = bool(self._processors) and self._processors == _json_chain
        self._write: Callable[[str], None] = self._logger.info
        #: the buffer's write_line where :meth:`fields` may make the text itself (the JSON chain
        #: on a buffered logger, no bound context), else None
        self._plain: Optional[Callable[[str], None]] = None
        if self._json:
            if isinstance(self._logger, _BufferedLogger):
                self._write = self._logger._buffer.write_line
                if not self._context:
                    self._plain = self._write

    def fields(self, event: str, build: Callable[[_T], dict[str, Any]],
               members: Callable[[_T], str], values: _T) -> None:
        """``self(event, build(values))``; where this line's chain is the buffered JSON chain
        with nothing bound (no context, no context variables) — the gateway's access log — the
        line is made as ``{`` + ``members(values)`` + event, level and timestamp instead, which
        must be the same text: ``members(values)`` is the JSON members of ``build(values)`` in
        their order (see :class:`JsonRun`)."""
        if not self.enabled:
            return
        if self._plain is None or _structlog_context_vars is None or _structlog_context_vars:
            self(event, build(values))
            return
        try:
            text = members(values)
        except Exception:  # noqa: BLE001 - the line must not fail the request: the dict says it
            self(event, build(values))
            return
        closing = _closings.get(event)
        if closing is None:
            closing = _closings[event] = (
                f',"event":{json_value(event)},"level":"info","timestamp":"')
        self._plain(f"{{{text}{closing}{_utc_iso(time.time_ns())}\"}}")

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        """Log ``fields`` (a dict the caller hands over: it becomes the event dict)."""
        if not self.enabled:
            return
        event_dict: Any = {**self._context, **fields} if self._context else fields
        event_dict["event"] = event
        logger = self._logger
        if self._json:
            # the JSON chain of configure_logging, step by step: merge_contextvars,
            # add_log_level (``info`` for the info method), _UtcIsoStamper, format_exc_info (a
            # no-op without ``exc_info``), _JsonRenderer; then the line to the buffer, which is
            # what ``logger.info(line)`` does
            if _structlog_context_vars is None or _structlog_context_vars:
                # (with no context variable ever bound there is nothing to merge)
                structlog.contextvars.merge_contextvars(logger, "info", event_dict)
            event_dict["level"] = "info"
            event_dict["timestamp"] = _utc_iso_now()
            if "exc_info" in event_dict:
                structlog.processors.format_exc_info(logger, "info", event_dict)
            self._write(_render_json(event_dict))
            return
        try:
            for processor in self._processors:
                event_dict = processor(logger, "info", event_dict)
        except structlog.DropEvent:
            return
        if isinstance(event_dict, (str, bytes, bytearray)):
            logger.info(event_dict)
        elif isinstance(event_dict, tuple):
            logger.info(*event_dict[0], **event_dict[1])
        else:
            logger.info(**event_dict)


def get_logger(name: str):
    return structlog.get_logger(name)
