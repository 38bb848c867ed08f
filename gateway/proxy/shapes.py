"""Request shapes: what an intercepted request's head bytes decide, remembered per authority.

Why: a fleet of scanners sends the same requests over and over, byte for byte — Go's
``net/http`` writes a request head the same way every time (a POM per dependency, the same
manifests and tokens) — and on a small cache hit parsing the head and routing it cost as much
as the rest of the answer (``docs/hit-path.md``). What parsing and routing make of those bytes
does not change between two arrivals, so it is kept, keyed by the bytes, and *replayed*.

Invariants:

* **Only pure steps are remembered.** A shape is recorded for a head that arrived as one whole
  chunk while the connection's HTTP/1.1 machine was at rest and parsed into exactly one
  complete request without a body, on an intercepted connection (its routing reads the head,
  the CONNECT authority and the proxy settings, nothing else), that routing sent to the
  pipeline. Refusals, CONNECT, requests with a body and the plain side (proxy authentication,
  policy and their counters run per request there) are never recorded.
* **Same inputs, same shape.** A memo belongs to one CONNECT authority and one
  :class:`~gateway.settings.proxy.ProxySettings` object: a reload gives new connections a new
  memo, and a connection keeps the one of the settings it was created with (as it keeps those
  settings).
* **Replay is the normal path from there on.** :meth:`Shape.prepare` gives a request what
  ``_prepare`` would have given it — a new access record and exchange per request (its own id,
  clock reading and client) — and the connection answers it exactly as a parsed one:
  ``try_hit``, the write, the accounting, or the hand-over to the task. The exchange's fields
  are a read-only view shared by the requests of one shape (every layer below copies before it
  changes fields), and it carries the shape as its :attr:`~gateway.exchange.Exchange.shape`,
  which the pipeline may key its own memos by.
* **Remembered on the second arrival.** A head seen once is only noted (its hash): a head that
  never comes back — a field that changes per request — costs a set insertion, not a shape.
* **Bounded.** At most :data:`SHAPES_MAX` shapes over all the memos of a server (a
  :class:`ShapeBudget`; when it is reached they all start over) and :data:`SHAPE_HEAD_MAX` bytes
  per head: ~2 KiB per shape, ~16 MiB at most.
"""
from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from ..exchange import Exchange
from . import http1
from .request import AccessRecord, RequestFields
from .routing import Prepared

#: shapes the memos of one server hold together before they all start over
SHAPES_MAX = 8192
#: a longer head is not remembered (a key this large is rare and costs memory per entry)
SHAPE_HEAD_MAX = 8 * 1024


class Shape:
    """One remembered head: the parsed :class:`~.http1.RequestHead`, its sorted fields and what
    routing decided (the record's and the exchange's fields)."""

    __slots__ = ("head", "fields", "method", "scheme", "host", "port", "path", "decision",
                 "target", "headers")

    def __init__(self, head: http1.RequestHead, prepared: Prepared) -> None:
        rec, ex = prepared.rec, prepared.routed
        assert type(ex) is Exchange and ex.body is None
        self.head = head
        self.fields: RequestFields = prepared.headers
        self.method = rec.method
        self.scheme, self.host, self.port = rec.scheme, rec.host, rec.port
        self.path, self.decision = rec.path, rec.decision
        self.target = ex.target
        # a copy: the first request's exchange is its own; the view makes a change an error
        self.headers = CIMultiDictProxy(CIMultiDict(ex.headers))

    def prepare(self, client: str, started: float) -> Prepared:
        """What ``_prepare`` gives a request with this head: new per-request objects."""
        rec = AccessRecord(client, self.method, started)
        rec.scheme, rec.host, rec.port = self.scheme, self.host, self.port
        rec.path, rec.decision = self.path, self.decision
        ex = Exchange(self.method, self.scheme, self.host, self.port, self.target,
                      self.headers, None, client, id=rec.id, started=started,  # type: ignore[arg-type]
                      notes={"decision": self.decision}, shape=self)
        rec.exchange = ex
        return Prepared(rec, self.fields, ex)


class ShapeBudget:
    """The shapes held by the memos of one server, and the memos (to start them all over)."""

    __slots__ = ("held", "memos")

    def __init__(self) -> None:
        self.held = 0
        self.memos: list["ShapeMemo"] = []

    def memo(self, settings: object) -> "ShapeMemo":
        memo = ShapeMemo(settings, self)
        self.memos.append(memo)
        return memo

    def retire(self, memo: "ShapeMemo") -> None:
        """``memo`` is replaced (a reload): forget its shapes (its connections make new ones)."""
        memo.clear()
        if memo in self.memos:
            self.memos.remove(memo)

    def start_over(self) -> None:
        for memo in self.memos:
            memo.clear()


class ShapeMemo:
    """The shapes of one CONNECT authority under one settings object."""

    __slots__ = ("settings", "shapes", "seen", "budget")

    def __init__(self, settings: object, budget: ShapeBudget) -> None:
        self.settings = settings
        self.shapes: dict[bytes, Shape] = {}
        #: hashes of heads that arrived once (a shape is made on the second arrival)
        self.seen: set[int] = set()
        self.budget = budget

    def clear(self) -> None:
        self.budget.held -= len(self.shapes)
        self.shapes.clear()
        self.seen.clear()

    def record(self, data: bytes, head: http1.RequestHead, prepared: Prepared) -> None:
        """Remember ``prepared`` (the routing of ``head``, parsed at rest from exactly
        ``data``) if it is a shape (see the module's invariants)."""
        ex = prepared.routed
        if type(ex) is not Exchange or ex.body is not None or len(data) > SHAPE_HEAD_MAX \
                or prepared.rec.error:
            return
        digest = hash(data)                      # cached by the bytes object: looked up before
        seen = self.seen
        if digest not in seen:
            if len(seen) >= SHAPES_MAX:
                seen.clear()
            seen.add(digest)
            return
        budget = self.budget
        if budget.held >= SHAPES_MAX:
            budget.start_over()
        if data not in self.shapes:
            budget.held += 1
        self.shapes[data] = Shape(head, prepared)

