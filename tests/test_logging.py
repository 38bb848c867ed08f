"""The JSON log line: fields, order and timestamp text as structlog's stock processors made them."""
from __future__ import annotations

import datetime
import io
import json
import re
from dataclasses import dataclass

import pytest
import structlog
from structlog.processors import TimeStamper

from gateway.observability.logging import InfoLine, _UtcIsoStamper, configure_logging, get_logger
from gateway.settings import LoggingSettings

#: what TimeStamper(fmt="iso", utc=True) writes: microseconds, omitted when they are zero
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$")


@pytest.fixture
def lines():
    """Logging configured as the gateway does, into a buffer; restores structlog's defaults."""
    buf = io.StringIO()
    configure_logging(LoggingSettings(level="info", format="json"), stream=buf)
    try:
        yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    finally:
        structlog.reset_defaults()


@dataclass
class _Secretive:
    password: str

    def __repr__(self) -> str:
        return "_Secretive(password=***)"


def test_access_line_fields_order_and_values(lines):
    # outside an event loop the line is written at once
    get_logger("gateway.access").bind().info(
        "request", request_id="a-1", client="127.0.0.1:1", method="GET", scheme="https",
        host="repo.maven.apache.org", port=443, path="/maven2/x.pom", status=200, bytes=4096,
        duration=0.0004, decision="intercept", cache="hit")
    (line,) = lines()
    assert list(line) == ["request_id", "client", "method", "scheme", "host", "port", "path",
                          "status", "bytes", "duration", "decision", "cache", "event", "level",
                          "timestamp"]
    assert line["duration"] == 0.0004 and line["event"] == "request" and line["level"] == "info"
    assert ISO_UTC.match(line["timestamp"]), line["timestamp"]


ACCESS_FIELDS = dict(request_id="a-1", client="127.0.0.1:1", method="GET", scheme="https",
                     host="repo.maven.apache.org", port=443, path="/maven2/x.pom", status=200,
                     bytes=4096, duration=0.0004, decision="intercept", cache="hit", door="proxy")


def test_info_line_writes_what_the_bound_logger_writes(lines):
    bound = get_logger("gateway.access").bind(conn="c-1")
    bound.info("request", **ACCESS_FIELDS)
    InfoLine(bound)("request", dict(ACCESS_FIELDS))
    first, second = lines()
    assert list(first) == list(second)
    first.pop("timestamp"), second.pop("timestamp")
    assert first == second and first["conn"] == "c-1"


def test_info_line_is_silent_above_info_and_follows_capture_logs():
    buf = io.StringIO()
    configure_logging(LoggingSettings(level="warning", format="json"), stream=buf)
    try:
        InfoLine(get_logger("gateway.access").bind())("request", dict(ACCESS_FIELDS))
        assert buf.getvalue() == ""
        configure_logging(LoggingSettings(level="info", format="json"), stream=buf)
        with structlog.testing.capture_logs() as captured:
            # bound inside the capture, as a connection accepted during a test is
            InfoLine(get_logger("gateway.access").bind())("request", dict(ACCESS_FIELDS))
        assert buf.getvalue() == ""
        assert [(e["event"], e["log_level"], e["path"]) for e in captured] == [
            ("request", "info", "/maven2/x.pom")]
    finally:
        structlog.reset_defaults()


def test_values_json_cannot_encode_are_logged_as_before(lines):
    log = get_logger("t")
    log.info("odd", settings=_Secretive("hunter2"), when=datetime.datetime(2020, 1, 2),
             big=2**70, keys={1: "one"}, text="é")
    (line,) = lines()
    assert "hunter2" not in json.dumps(line)
    assert line["settings"] == "_Secretive(password=***)"      # repr, as json.dumps' default did
    assert line["when"] == repr(datetime.datetime(2020, 1, 2))
    assert line["big"] == 2**70 and line["keys"] == {"1": "one"} and line["text"] == "é"


def test_timestamp_text_matches_structlog_timestamper():
    ours, stock = _UtcIsoStamper(), TimeStamper(fmt="iso", utc=True)
    a = ours(None, "info", {})["timestamp"]
    b = stock(None, "info", {})["timestamp"]
    assert ISO_UTC.match(a) and ISO_UTC.match(b)
    parse = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    assert abs((parse(b) - parse(a)).total_seconds()) < 60  # the same clock, the same zone


def test_timestamp_drops_zero_microseconds_like_isoformat(monkeypatch):
    import gateway.observability.logging as logging_module

    monkeypatch.setattr(logging_module.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    stamp = _UtcIsoStamper()(None, "info", {})["timestamp"]
    ref = datetime.datetime.fromtimestamp(1_700_000_000, datetime.timezone.utc)
    assert stamp == ref.isoformat().replace("+00:00", "Z") == "2023-11-14T22:13:20Z"
    monkeypatch.setattr(logging_module.time, "time_ns", lambda: 1_700_000_000_000_123_999)
    assert _UtcIsoStamper()(None, "info", {})["timestamp"] == "2023-11-14T22:13:20.000123Z"


def test_info_line_json_chain_same_text_with_contextvars_and_exc_info(lines):
    """InfoLine runs the configured JSON chain inline: context variables, exc_info and
    undumpable values come out as the bound logger writes them."""
    bound = get_logger("gateway.access").bind(conn="c-2")
    line = InfoLine(bound)
    assert line._json                                   # the inline chain, not the generic loop
    structlog.contextvars.bind_contextvars(trace="t-9")
    try:
        try:
            raise ValueError("boom")
        except ValueError as exc:
            extra = dict(ACCESS_FIELDS, exc_info=exc, settings=_Secretive("hunter2"))
            bound.info("request", **extra)
            line("request", dict(extra))
    finally:
        structlog.contextvars.clear_contextvars()
    first, second = lines()
    assert list(first) == list(second)
    first.pop("timestamp"), second.pop("timestamp")
    assert first == second
    assert first["trace"] == "t-9" and "ValueError: boom" in first["exception"]
    assert first["settings"] == "_Secretive(password=***)" and "exc_info" not in first


def test_a_burst_is_written_in_batches_of_flush_lines_in_order():
    """On an event loop lines wait for the flush timer, except that every FLUSH_LINES-th line
    writes the batch at once (bounded memory, cache-sized batches); order is kept."""
    import asyncio

    from gateway.observability import logging as logging_module

    buf = io.StringIO()
    configure_logging(LoggingSettings(level="info", format="json"), stream=buf)
    n = logging_module.FLUSH_LINES

    async def burst() -> tuple[int, int]:
        line = InfoLine(get_logger("gateway.access").bind())
        for i in range(n - 1):
            line("request", {"i": i})
        before = len(buf.getvalue().splitlines())          # all waiting for the timer
        line("request", {"i": n - 1})
        line("request", {"i": n})
        return before, len(buf.getvalue().splitlines())

    try:
        before, after = asyncio.run(burst())
        logging_module.structlog.get_config()["logger_factory"]()._buffer.flush()
        written = [json.loads(text)["i"] for text in buf.getvalue().splitlines()]
    finally:
        structlog.reset_defaults()
    assert (before, after) == (0, n) and written == list(range(n + 1))


def _json_buffer_and_builder():
    """Logging configured as the gateway does into a buffer; a field builder for
    ``InfoLine.later`` that records when it is called."""
    buf = io.StringIO()
    configure_logging(LoggingSettings(level="info", format="json"), stream=buf)
    built: list[tuple] = []

    def build(values: tuple) -> dict:
        built.append(values)
        return dict(zip(ACCESS_FIELDS, values))

    return buf, built, build


def test_a_deferred_line_is_the_line_info_line_writes_in_its_place(monkeypatch):
    """``InfoLine.later`` (the access log): the values are taken at the call, the text is made
    when the batch is written — the same text ``InfoLine`` writes for them at that moment, in
    the same place among the other lines; a line that cannot be made is reported, not the
    batch lost."""
    import asyncio

    from gateway.observability import logging as logging_module

    # as in a gateway process, where no context variable is ever bound (an earlier test may
    # have bound one in this process; then lines are rendered at once, see the next test)
    monkeypatch.setattr(logging_module, "_structlog_context_vars", {})
    monkeypatch.setattr(logging_module.time, "time_ns", lambda: 1_700_000_000_123_456_789)
    buf, built, build = _json_buffer_and_builder()

    def broken(values: tuple) -> dict:
        raise KeyError("no such field")

    async def log_some() -> None:
        line = InfoLine(get_logger("gateway.access").bind())
        line("request", dict(ACCESS_FIELDS))
        line.later("request", build, tuple(ACCESS_FIELDS.values()))
        get_logger("gateway.proxy").info("something_else", n=1)
        line.later("request", broken, ())
        line.later("request", build, tuple(ACCESS_FIELDS.values()))
        assert built == [] and buf.getvalue() == ""     # nothing rendered before the batch

    try:
        asyncio.run(log_some())
        structlog.get_config()["logger_factory"]()._buffer.flush()
    finally:
        structlog.reset_defaults()
    text = buf.getvalue().splitlines()
    assert len(text) == 5 and len(built) == 2
    assert text[1] == text[0] and text[4] == text[0]    # byte for byte
    assert json.loads(text[0])["timestamp"] == "2023-11-14T22:13:20.123456Z"
    assert json.loads(text[2])["event"] == "something_else"
    failed = json.loads(text[3])
    assert failed["event"] == "log_line_failed" and "KeyError" in failed["error"]


def test_a_deferred_line_is_rendered_at_once_where_it_cannot_wait(monkeypatch):
    """Bound context variables belong to the moment of the call, and a chain that is not the
    buffered JSON one (console format, capture_logs) has no batch: then ``later`` logs at once."""
    from gateway.observability import logging as logging_module

    import asyncio

    monkeypatch.setattr(logging_module, "_structlog_context_vars", {"structlog_trace": object()})
    buf, built, build = _json_buffer_and_builder()

    async def log_one() -> None:
        InfoLine(get_logger("gateway.access").bind()).later(
            "request", build, tuple(ACCESS_FIELDS.values()))
        assert len(built) == 1                          # made now, though written with the batch

    try:
        asyncio.run(log_one())
        structlog.get_config()["logger_factory"]()._buffer.flush()
        assert json.loads(buf.getvalue())["request_id"] == "a-1"
    finally:
        structlog.reset_defaults()
    with structlog.testing.capture_logs() as logs:
        InfoLine(get_logger("gateway.access").bind()).later(
            "request", lambda v: dict(zip(ACCESS_FIELDS, v)), tuple(ACCESS_FIELDS.values()))
    assert logs and logs[0]["request_id"] == "a-1" and logs[0]["event"] == "request"
