"""Answers built from a cache entry: the pre-rendered head (``Response.head``) the proxy sends
for hits must be exactly what rendering ``Response.headers`` would give, for every shape of hit.
(The gateway tests exercise the same responses over real connections.)"""
from __future__ import annotations

import time

import pytest
from multidict import CIMultiDict

from gateway.cache import BlobStore, Entry
from gateway.exchange import BytesBody, Exchange, header_line
from gateway.observability.metrics import CacheResult, Metrics
from gateway.pipeline.serve import cache_status, response_from_entry

BODY = b"<project>demo</project>\n" * 100


def entry(headers=None) -> Entry:
    now = time.time()
    return Entry(key="maven|x", kind="maven", status=200,
                 headers=headers or [("Content-Type", "text/xml"), ("ETag", '"abc"'),
                                     ("Last-Modified", "Mon, 02 Jan 2023 10:00:00 GMT"),
                                     ("X-Checksum-Sha1", "0123456789abcdef")],
                 body_digest="sha256:" + "0" * 64, body_size=len(BODY), validated_at=now - 42,
                 fresh_until=float("inf"), etag='"abc"')


def exchange(method="GET", **headers) -> Exchange:
    return Exchange(method=method, scheme="https", host="repo.maven.apache.org", port=443,
                    target="/maven2/x.pom", headers=CIMultiDict(headers))


@pytest.fixture
def blobs(tmp_path):
    store = BlobStore(tmp_path / "cache", 1 << 30, 0, Metrics())
    store.open()
    return store


def rendered(response) -> bytes:
    return b"".join(header_line(k, v) for k, v in response.headers.items())


@pytest.mark.parametrize("method,headers,status", [
    ("GET", {}, 200),
    ("HEAD", {}, 200),
    ("GET", {"Range": "bytes=10-99"}, 206),
    ("GET", {"Range": "bytes=10-99", "If-Range": '"other"'}, 200),
])
def test_head_equals_rendered_headers(blobs, method, headers, status):
    e = entry()
    r = response_from_entry(exchange(method, **headers), e, BODY, blobs,
                            cache_status(CacheResult.HIT, ttl=None))
    assert r.status == status
    assert r.head is not None and r.head == rendered(r)
    assert b"Age: 42\r\n" in r.head and b"Cache-Status: trivy-gateway; hit\r\n" in r.head
    if status == 206:
        assert isinstance(r.body, BytesBody) and r.body.data == BODY[10:100]
        assert b"Content-Range: bytes 10-99/2400\r\n" in r.head


def test_head_follows_revalidated_fields_and_rejects_bad_ones(blobs):
    e = entry()
    first = response_from_entry(exchange(), e, BODY, blobs, cache_status(CacheResult.HIT))
    e.headers = [(k, '"new"' if k == "ETag" else v) for k, v in e.headers]   # as revalidation does
    second = response_from_entry(exchange(), e, BODY, blobs, cache_status(CacheResult.REVALIDATED))
    assert b'ETag: "abc"' in first.head and b'ETag: "new"' in second.head
    assert second.head == rendered(second)
    # a stored value that could split the response: no pre-rendered head, the proxy's normal
    # path (which refuses it with a 502) decides
    bad = entry(headers=[("X-Evil", "a\r\nSet-Cookie: x=1")])
    r = response_from_entry(exchange(), bad, BODY, blobs, cache_status(CacheResult.HIT))
    assert r.head is None


def test_not_modified_and_unsatisfiable_have_no_head(blobs):
    e = entry()
    r = response_from_entry(exchange(**{"If-None-Match": '"abc"'}), e, BODY, blobs,
                            cache_status(CacheResult.HIT))
    assert r.status == 304 and r.head is None
    r = response_from_entry(exchange(Range="bytes=99999-"), e, BODY, blobs, cache_status(CacheResult.HIT))
    assert r.status == 416 and r.head is None


def test_answers_from_one_entry_are_shared_and_read_only(blobs):
    """A hit's answer is built once per (Age, Cache-Status) and body, and the requests that get
    it share it: its fields are a read-only view, so no layer can change another request's
    answer (one that wants other fields makes a new Response, as the mirror door does)."""
    e = entry()
    status = cache_status(CacheResult.HIT)
    now = e.validated_at + 42.2
    first = response_from_entry(exchange(), e, BODY, blobs, status, now=now)
    with pytest.raises(TypeError):
        first.headers["X-Mine"] = "1"            # type: ignore[index]
    with pytest.raises(TypeError):
        del first.headers["ETag"]                # type: ignore[attr-defined]
    assert first.headers["ETag"] == '"abc"' and first.head == rendered(first)
    # the same second, the same body: the same answer
    assert response_from_entry(exchange(), e, BODY, blobs, status, now=now + 0.5) is first
    # another Age: another answer, and the first one is unchanged
    later = response_from_entry(exchange(), e, BODY, blobs, status, now=now + 5)
    assert later is not first and later.headers["Age"] == "47" and first.headers["Age"] == "42"
    assert later.head == rendered(later) and first.head == rendered(first)
    # another body object (an entry re-read into memory) is never answered with the old one
    again = bytes(bytearray(BODY))
    other = response_from_entry(exchange(), e, again, blobs, status, now=now + 5)
    assert other is not later and other.body.data is again   # type: ignore[attr-defined]
    # HEAD has its own (no body), shared too
    head = response_from_entry(exchange("HEAD"), e, BODY, blobs, status, now=now + 5)
    assert head is not later and head.body.length == len(BODY)
    assert response_from_entry(exchange("HEAD"), e, BODY, blobs, status, now=now + 5) is head


def test_shared_answers_hold_a_bounded_amount_of_body_bytes(blobs, monkeypatch):
    """The shared GET answers keep their bodies (and the proxy the bytes written for them) in
    memory: together they stay within SHARED_BODIES_MAX, so an entry the memory front evicted
    does not stay in memory because its last answer was kept; a body let go is rebuilt when
    asked for again (a new answer, the same bytes)."""
    from gateway.pipeline import serve

    monkeypatch.setattr(serve, "SHARED_BODIES_MAX", 5 * 2 * len(BODY))   # five shared bodies
    status = cache_status(CacheResult.HIT)
    entries = [entry(headers=[("Content-Type", "text/xml"), ("ETag", f'"{i}"')])
               for i in range(12)]
    bodies = [bytes(bytearray(BODY)) for _ in entries]
    first = [response_from_entry(exchange(), e, b, blobs, status, now=e.validated_at + 42.2)
             for e, b in zip(entries, bodies)]
    assert serve._shared.held <= serve.SHARED_BODIES_MAX
    held = sum(1 for r in serve._rendered.values() if r.get is not None)
    assert 1 <= held <= 5
    # the last one is still shared; an early one was let go and is made anew, same content
    last = response_from_entry(exchange(), entries[-1], bodies[-1], blobs, status,
                               now=entries[-1].validated_at + 42.2)
    assert last is first[-1]
    again = response_from_entry(exchange(), entries[0], bodies[0], blobs, status,
                                now=entries[0].validated_at + 42.2)
    assert again is not first[0] and again.head == first[0].head
    assert again.body.data is bodies[0]          # type: ignore[attr-defined]
    assert serve._shared.held <= serve.SHARED_BODIES_MAX
