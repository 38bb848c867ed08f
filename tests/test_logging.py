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


def _random_records(rng, n: int):
    """Access records with the values a line can carry: odd text (quotes, backslashes, control
    characters, non-ASCII, surrogates), empty and zero fields, errors, request bodies."""
    from gateway.exchange import new_request_id
    from gateway.proxy.request import AccessRecord

    texts = ["/maven2/x.pom", "", "/a\"b\\c", "/\u00e9\u4e2d\U0001f600", "/ctl\x00\x1f\x7f",
             "/p?q=1&r=\u2028", "\ud800", "x" * 300]
    for i in range(n):
        rec = AccessRecord(rng.choice(["127.0.0.1:40000", "[::1]:1", "c\"li\\ent", ""]),
                           rng.choice(["GET", "HEAD", "", "CONNECT", "G\u00c9T"]), 0.0,
                           rng.choice([None, "a-1", "\u00e9\"x"]) or new_request_id())
        rec.scheme = rng.choice(["https", "http", ""])
        rec.host = rng.choice(["repo.maven.apache.org", "", "h\u00f6st"])
        rec.port = rng.choice([443, 0, 8443, 2**40])
        rec.path = rng.choice(texts)
        rec.status = rng.choice([200, 0, 404, 502])
        rec.bytes = rng.choice([0, 4096, 2**62, rng.randrange(10**9)])
        rec.decision = rng.choice(["intercept", "none", "mirror", "den\"y"])
        rec.door = rng.choice(["proxy", "mirror"])
        if rng.random() < 0.3:
            rec.bytes_in = rng.choice([1, 2**33])
        if rng.random() < 0.3:
            rec.error = rng.choice(texts)
        duration = rng.choice([0.0, 0.0001, 1.0, 12345.6789, rng.random() * 10 ** rng.randrange(-4, 6)])
        # the connection rounds it before the line is made (ClientConnection._account)
        duration = int(duration * 10000.0 + 0.5) / 10000.0
        yield rec, duration, rng.choice([None, "hit", "miss", "stale", "h\u00eft"])


def test_a_line_made_from_remembered_runs_is_the_line_rendered_whole(monkeypatch):
    """``InfoLine.fields`` (the access log) makes the text from ``JsonRun`` members where
    nothing is bound: byte for byte the text the whole-dict path writes for the same values,
    over random values, repeated ones (remembered runs) included."""
    import asyncio
    import random

    from gateway.observability import logging as logging_module
    from gateway.proxy.connection import _access_fields, _access_members

    monkeypatch.setattr(logging_module, "_structlog_context_vars", {})
    monkeypatch.setattr(logging_module.time, "time_ns", lambda: 1_700_000_000_123_456_789)
    buf = io.StringIO()
    configure_logging(LoggingSettings(level="info", format="json"), stream=buf)
    values = list(_random_records(random.Random(1309), 400))
    values += values[:100]                       # the runs of these are remembered now
    whole: list[str] = []

    async def log_all() -> None:
        line = InfoLine(get_logger("gateway.access").bind())
        assert line._plain is not None           # the members path is the one taken
        for v in values:
            line.fields("request", _access_fields, _access_members, v)
            line("request", _access_fields(v))

    try:
        asyncio.run(log_all())
        structlog.get_config()["logger_factory"]()._buffer.flush()
    finally:
        structlog.reset_defaults()
    text = buf.getvalue().split("\n")[:-1]     # not splitlines(): U+2028 is in a line
    assert len(text) == 2 * len(values)
    odd = 0
    for made, rendered in zip(text[0::2], text[1::2]):
        if "\\ud800" in rendered:
            # a value orjson refuses (a lone surrogate) sends the whole-dict path to json.dumps
            # (other separators, non-ASCII escaped), the members path only that value: the
            # same values, another spelling
            odd += 1
            assert json.loads(made) == json.loads(rendered)
        else:
            assert made == rendered
    assert 0 < odd < len(values) / 2
    first = json.loads(text[0])
    assert list(first)[-3:] == ["event", "level", "timestamp"]
    assert first["timestamp"] == "2023-11-14T22:13:20.123456Z"


def test_json_run_remembers_a_bounded_number_of_texts(monkeypatch):
    from gateway.observability import logging as logging_module

    monkeypatch.setattr(logging_module, "JSON_RUN_MAX", 3)
    run = logging_module.JsonRun(("a", "b"))
    assert run.text((1, "x")) == '"a":1,"b":"x"'
    for i in range(10):
        assert run.text((i, None)) == f'"a":{i},"b":null'
        assert len(run.texts) <= 3


def test_fields_logs_the_whole_dict_where_something_is_bound():
    """Bound context variables, a bound context and a chain that is not the buffered JSON one
    (console format, capture_logs) take the whole-dict path: the members are not used."""
    from gateway.observability import logging as logging_module

    def members(values):
        raise AssertionError("the members text must not be used here")

    build = lambda v: dict(zip(ACCESS_FIELDS, v))  # noqa: E731
    values = tuple(ACCESS_FIELDS.values())
    buf = io.StringIO()
    configure_logging(LoggingSettings(level="info", format="json"), stream=buf)
    try:
        structlog.contextvars.bind_contextvars(trace="t-1")
        try:
            InfoLine(get_logger("gateway.access").bind()).fields("request", build, members, values)
        finally:
            structlog.contextvars.clear_contextvars()
        InfoLine(get_logger("gateway.access").bind(conn="c-1")).fields(
            "request", build, members, values)
        structlog.get_config()["logger_factory"]()._buffer.flush()
        first, second = [json.loads(t) for t in buf.getvalue().splitlines()]
        assert first["trace"] == "t-1" and first["request_id"] == "a-1"
        assert second["conn"] == "c-1" and list(second)[:2] == ["conn", "request_id"]
        with structlog.testing.capture_logs() as logs:
            InfoLine(get_logger("gateway.access").bind()).fields("request", build, members, values)
        assert logs and logs[0]["request_id"] == "a-1" and logs[0]["event"] == "request"
    finally:
        structlog.reset_defaults()


def test_a_members_function_that_fails_gives_the_whole_dict_line(monkeypatch):
    """A log line never fails the request: if the members text cannot be made, the line is
    rendered from the dict."""
    import asyncio

    from gateway.observability import logging as logging_module

    monkeypatch.setattr(logging_module, "_structlog_context_vars", {})
    buf = io.StringIO()
    configure_logging(LoggingSettings(level="info", format="json"), stream=buf)

    def broken(values):
        raise TypeError("unhashable")

    async def log_one() -> None:
        InfoLine(get_logger("gateway.access").bind()).fields(
            "request", lambda v: dict(zip(ACCESS_FIELDS, v)), broken,
            tuple(ACCESS_FIELDS.values()))

    try:
        asyncio.run(log_one())
        structlog.get_config()["logger_factory"]()._buffer.flush()
    finally:
        structlog.reset_defaults()
    line = json.loads(buf.getvalue())
    assert line["request_id"] == "a-1" and line["event"] == "request"
