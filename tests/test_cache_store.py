"""Blob store and entry store on a real filesystem: verification, atomic publish, followers,
eviction that respects pins, recovery after a crash."""
import asyncio
import hashlib
import os

import pytest

from gateway.cache import BlobStore, DigestMismatch, Entry, EntryStore, FillFailed, StoreFull
from gateway.cache.entries import SHARED_HOT_SECONDS
from gateway.observability.metrics import Metrics
from gateway.settings import MemoryFrontSettings


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path):
    s = BlobStore(tmp_path / "cache", max_size=10 * 1024 * 1024, min_free_space=0, metrics=Metrics())
    s.open()
    return s


async def test_fill_verifies_and_publishes_atomically(store):
    data = os.urandom(300_000)
    fill = store.begin_fill(digest(data), len(data))
    fill.write(data[:1000])
    assert not store.has(digest(data))  # nothing visible before commit
    fill.write(data[1000:])
    assert fill.commit() == digest(data)
    assert store.has(digest(data))
    assert store.path_of(digest(data)).read_bytes() == data
    assert list(store.tmp_dir.iterdir()) == []


async def test_digest_mismatch_is_never_stored(store):
    data = b"x" * 5000
    wrong = digest(b"something else")
    fill = store.begin_fill(wrong, len(data))
    fill.write(data)
    with pytest.raises(DigestMismatch):
        fill.commit()
    assert not store.has(wrong) and not store.has(digest(data))
    assert list(store.tmp_dir.iterdir()) == []


async def test_truncated_body_is_never_stored(store):
    data = b"y" * 5000
    fill = store.begin_fill(None, 6000)
    fill.write(data)
    with pytest.raises(DigestMismatch):
        fill.commit()
    assert store.count == 0


async def test_followers_stream_while_fill_grows(store):
    data = os.urandom(2 * 1024 * 1024)
    fill = store.begin_fill(digest(data), len(data))
    got = [bytearray(), bytearray()]
    first_byte_before_commit = []

    async def follower(i):
        async for chunk in fill.follow():
            if not got[i]:
                first_byte_before_commit.append(fill.state == "filling")
            got[i] += chunk

    tasks = [asyncio.create_task(follower(i)) for i in range(2)]
    for off in range(0, len(data), 64 * 1024):
        fill.write(data[off:off + 64 * 1024])
        await asyncio.sleep(0)
    fill.commit()
    await asyncio.gather(*tasks)
    assert all(bytes(g) == data for g in got)
    assert first_byte_before_commit == [True, True]


async def test_followers_abort_when_fill_fails(store):
    fill = store.begin_fill(None, 100)
    fill.write(b"a" * 10)

    async def follow():
        return [c async for c in fill.follow()]

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.01)
    fill.fail(RuntimeError("upstream died"))
    with pytest.raises(FillFailed):
        await task


async def test_lru_eviction_skips_pinned_blobs(tmp_path):
    s = BlobStore(tmp_path / "c", max_size=3000, min_free_space=0, metrics=Metrics())
    s.open()
    a, b, c = b"a" * 1000, b"b" * 1000, b"c" * 1500
    da = s.put_bytes(a)
    db = s.put_bytes(b)
    assert s.pin(da) is not None  # being read: must survive
    s.put_bytes(c)  # needs room: b is the only unpinned candidate
    assert s.has(da) and not s.has(db) and s.has(digest(c))
    assert s.size <= 3000


async def test_store_full_is_reported_not_raised_mid_request(tmp_path):
    s = BlobStore(tmp_path / "c", max_size=1000, min_free_space=0, metrics=Metrics())
    s.open()
    with pytest.raises(StoreFull):
        s.begin_fill(None, 5000)
    # free-space floor larger than the disk → refuses to start a fill
    s2 = BlobStore(tmp_path / "d", max_size=10**12, min_free_space=10**18, metrics=Metrics())
    s2.open()
    with pytest.raises(StoreFull):
        s2.begin_fill(None, 10)


async def test_restart_drops_partial_fills_and_keeps_published(tmp_path):
    root = tmp_path / "cache"
    s = BlobStore(root, 10**9, 0, Metrics())
    s.open()
    good = s.put_bytes(b"published")
    partial = s.begin_fill(None, 10**6)
    partial.write(b"half of it")  # process "dies" here: no commit, no fail
    s2 = BlobStore(root, 10**9, 0, Metrics())
    s2.open()
    assert s2.has(good)
    assert list(s2.tmp_dir.iterdir()) == []
    assert s2.count == 1


def test_open_exports_the_disk_budget_and_the_size_on_disk(tmp_path):
    """Both gauges of the dashboard's "Cache disk vs budget" (and of the cache-almost-full
    alert) are set when the store opens, also for a process beside a running gateway."""
    root = tmp_path / "cache"
    first = BlobStore(root, 10 * 1024 * 1024, 0, Metrics())
    first.open()
    first.put_bytes(b"z" * 4096)
    for clean_tmp in (True, False):
        metrics = Metrics()
        assert metrics.registry.get_sample_value("trivy_gateway_cache_max_size_bytes") == 0
        BlobStore(root, 10 * 1024 * 1024, 0, metrics).open(clean_tmp=clean_tmp)
        assert metrics.registry.get_sample_value("trivy_gateway_cache_max_size_bytes") \
            == 10 * 1024 * 1024
        assert metrics.registry.get_sample_value("trivy_gateway_cache_size_bytes") == 4096


async def test_verify_removes_corrupt_blob(store):
    d = store.put_bytes(b"hello world")
    path = store.path_of(d)
    os.chmod(path, 0o644)
    path.write_bytes(b"hello w0rld")
    assert store.verify(d) is False
    assert not store.has(d)


async def test_entry_store_roundtrip_and_missing_blob(tmp_path):
    blobs = BlobStore(tmp_path / "c", 10**9, 0, Metrics())
    blobs.open()
    entries = EntryStore(tmp_path / "c", blobs, MemoryFrontSettings(), Metrics())
    entries.open()
    body = b'{"schemaVersion":2}'
    d = blobs.put_bytes(body)
    e = Entry(key="k1", kind="oci_manifest", status=200, headers=[("Content-Type", "x")],
              body_digest=d, body_size=len(body), validated_at=1.0, fresh_until=float("inf"))
    await entries.put(e, body)
    got, got_body = await entries.get("k1")
    assert got.fresh_until == float("inf") and got_body == body
    # a fresh process (no memory front) reads it from disk
    entries2 = EntryStore(tmp_path / "c", blobs, MemoryFrontSettings(), Metrics())
    entries2.open()
    got2, body2 = await entries2.get("k1")
    assert got2.key == "k1" and body2 == body
    # the body blob disappears → the entry is treated as absent, never served empty
    blobs.remove(d)
    entries3 = EntryStore(tmp_path / "c", blobs, MemoryFrontSettings(), Metrics())
    entries3.open()
    assert await entries3.get("k1") is None


async def test_memory_front_hot_values_stay_coherent_with_aiocache(tmp_path):
    """The parsed values served without calling aiocache follow every write: update, delete,
    LRU eviction by the byte budget (from both), clear."""
    blobs = BlobStore(tmp_path / "c", 10**9, 0, Metrics())
    blobs.open()
    entries = EntryStore(tmp_path / "c", blobs,
                         MemoryFrontSettings(max_item_size=1000, max_size=3500), Metrics())
    entries.open()
    front = entries.front

    def entry(key: str, body: bytes, fresh_until: float = float("inf")) -> Entry:
        return Entry(key=key, kind="maven", status=200, headers=[], body_digest=blobs.put_bytes(body),
                     body_size=len(body), validated_at=1.0, fresh_until=fresh_until)

    b1, b2, b3 = b"1" * 1000, b"2" * 1000, b"3" * 1000
    await entries.put(entry("k1", b1), b1)
    await entries.put(entry("k2", b2), b2)
    assert (await entries.get("k1"))[1] == b1          # k1 is now the most recently used
    await entries.put(entry("k3", b3), b3)              # 3 × 1512 > 3500: k2 is evicted
    assert await front.get("k2") is None and await front.cache.get("k2") is None
    assert (await entries.get("k2"))[1] == b2           # still on disk: read back, k1 evicted
    assert await front.get("k1") is None and await front.cache.get("k1") is None

    await entries.put(entry("k3", b3, fresh_until=50.0), b3)   # an update replaces the value
    assert (await entries.get("k3"))[0].fresh_until == 50.0
    assert (await front.cache.get("k3"))[0].fresh_until == 50.0
    await entries.delete("k3")
    assert await entries.get("k3") is None and await front.cache.get("k3") is None
    await front.clear()
    assert await front.get("k2") is None


async def test_redis_memory_front_shares_small_entries_between_replicas(tmp_path):
    """Two gateways' entry stores on one real Redis: a small entry stored by one is a hit for
    the other, whose disk never saw it."""
    import shutil
    import subprocess

    from tests.gateway_harness import free_port

    server = shutil.which("redis-server")
    assert server, "redis-server is required (apt-get install redis-server)"
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        front = MemoryFrontSettings(backend="redis", redis_url=f"redis://127.0.0.1:{port}/0")
        stores = []
        clock = [1000.0]                  # B's monotonic clock, moved by the test
        for name in ("a", "b"):
            blobs = BlobStore(tmp_path / name, 10**9, 0, Metrics())
            blobs.open()
            entries = EntryStore(tmp_path / name, blobs, front, Metrics(),
                                 monotonic=lambda: clock[0])
            entries.open()
            stores.append((blobs, entries))
        for _ in range(50):  # wait for redis to accept connections (bounded)
            try:
                await stores[0][1].front.cache.exists("ping")
                break
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.1)
        body = b"<project>pom</project>"
        d = stores[0][0].put_bytes(body)
        e = Entry(key="maven|x", kind="maven", status=200, headers=[], body_digest=d,
                  body_size=len(body), validated_at=1.0, fresh_until=float("inf"))
        await stores[0][1].put(e, body)
        got = await stores[1][1].get("maven|x")
        assert got is not None and got[1] == body and not stores[1][0].has(d)

        # a mutable entry is always read from Redis: B sees A's revalidated version at once
        tag = Entry(key="tag|t", kind="oci_manifest", status=200, headers=[], body_digest=d,
                    body_size=len(body), validated_at=1.0, fresh_until=100.0)
        await stores[0][1].put(tag, body)
        assert (await stores[1][1].get("tag|t"))[0].fresh_until == 100.0
        tag2 = Entry(**{**tag.__dict__, "fresh_until": 200.0})
        await stores[0][1].put(tag2, body)
        assert (await stores[1][1].get("tag|t"))[0].fresh_until == 200.0
        # an immutable one may be served from B's process, for SHARED_HOT_SECONDS at most
        await stores[0][1].front.delete("maven|x")
        assert (await stores[1][1].front.get("maven|x"))[1] == body     # still B's hot copy
        clock[0] += SHARED_HOT_SECONDS + 0.1
        assert await stores[1][1].front.get("maven|x") is None
    finally:
        proc.terminate()
        proc.wait(10)


async def test_slow_follower_finishes_when_fill_completes_while_it_is_busy(store):
    """Regression: a follower suspended in its consumer while the producer writes its last
    bytes and commits must still finish (no lost wakeup)."""
    data = os.urandom(3 * 256 * 1024)
    fill = store.begin_fill(digest(data), len(data))
    fill.write(data[:256 * 1024 + 1])
    got = bytearray()
    gen = fill.follow()
    got += await gen.__anext__()  # the consumer now "sends" this chunk; meanwhile:
    fill.write(data[256 * 1024 + 1:])
    fill.commit()
    async def rest():
        async for chunk in gen:
            got.extend(chunk)
    await asyncio.wait_for(rest(), timeout=5)
    assert bytes(got) == data


async def test_unknown_length_fill_stops_at_the_largest_object_and_evicts_nothing(tmp_path):
    """D6: a body of unknown length (chunked) larger than max_object_share × max_size is not
    stored: at the limit the fill stops writing and passes the rest through (with no reader
    left, the producer is told to stop); the temp file goes, everything already cached stays."""
    mib = 1024 * 1024
    s = BlobStore(tmp_path / "c", max_size=4 * mib, min_free_space=0, metrics=Metrics(),
                  max_object_size=2 * mib)
    s.open()
    kept = [s.put_bytes(bytes([i]) * mib) for i in range(3)]   # 3 MiB cached
    fill = s.begin_fill(None, None)
    piece = os.urandom(256 * 1024)
    stored = [fill.write(piece) for _ in range(64)]             # a 16 MiB chunked body
    assert stored.count(True) == 8 and fill.state == "relaying" and fill.written == 2 * mib
    with pytest.raises(FillFailed, match="no client"):
        await fill.relay(piece)                                 # nobody reads: stop fetching
    fill.fail(FillFailed("no client"))
    assert list(s.tmp_dir.iterdir()) == []
    assert all(s.has(d) for d in kept) and s.size == 3 * mib
    # known length: refused up front, nothing evicted
    with pytest.raises(StoreFull, match="max_object_share"):
        s.begin_fill(None, 3 * mib)
    assert all(s.has(d) for d in kept)
    # a body within the share is stored, evicting only what it needs
    data = os.urandom(2 * mib)
    small = s.begin_fill(None, None)
    assert small.write(data)
    assert small.commit() == digest(data)
    assert s.size <= 4 * mib and sum(s.has(d) for d in kept) == 2


async def test_too_large_fill_is_passed_through_to_its_readers(tmp_path):
    """The readers of a fill that passed the limit get the whole body (disk part, then the
    in-memory window), the producer waiting for the slowest; nothing is stored."""
    from gateway.cache import blobstore

    mib = 1024 * 1024
    s = BlobStore(tmp_path / "c", max_size=4 * mib, min_free_space=0, metrics=Metrics(),
                  max_object_size=1 * mib)
    s.open()
    data = os.urandom(3 * blobstore.RELAY_WINDOW + 12345)
    fill = s.begin_fill(None, None)
    readers = [fill.follow(), fill.follow()]                    # registered before any byte
    got = [bytearray(), bytearray()]

    async def read(i, pause):
        async for chunk in readers[i]:
            got[i] += chunk
            if pause:
                await asyncio.sleep(0)                          # a slower client

    async def produce():
        for off in range(0, len(data), 64 * 1024):
            chunk = data[off:off + 64 * 1024]
            if not fill.write(chunk):
                await fill.relay(chunk)
            await asyncio.sleep(0)
        fill.finish_relay()

    await asyncio.gather(produce(), read(0, False), read(1, True))
    assert bytes(got[0]) == data and bytes(got[1]) == data
    assert fill.state == "relayed" and fill._window_bytes <= blobstore.RELAY_WINDOW + 64 * 1024
    assert s.count == 0 and list(s.tmp_dir.iterdir()) == []
    # a reader arriving after the window moved on cannot be served from it
    late = fill.follow()
    with pytest.raises(blobstore.PassThroughGap):
        async for _ in late:
            pass


async def test_unknown_length_fill_stops_below_min_free_space(tmp_path):
    """The free-space floor is checked while an unknown-length fill grows, not only at start."""
    s = BlobStore(tmp_path / "c", max_size=1024**4, min_free_space=0, metrics=Metrics())
    s.open()
    fill = s.begin_fill(None, None)
    assert fill.write(b"x" * 1024)
    free = s.free_space()
    assert free is not None
    s.min_free_space = free + 1                  # the filesystem is now "full" for the cache
    stored = [fill.write(b"y" * (1024 * 1024)) for _ in range(40)]
    assert False in stored and fill.state == "relaying"
    assert fill.written < 9 * 1024 * 1024        # checked every SPACE_CHECK_BYTES
    fill.fail(FillFailed("stopped"))
    assert list(s.tmp_dir.iterdir()) == []


async def test_cache_purge_repo_and_host_match_exactly(tmp_path):
    """D16: ``cache purge --repo`` names one repository exactly (``trivy-db`` alone selects
    nothing; ``aquasec/trivy-db`` is not ``aquasec/trivy-db-extra`` nor ghcr.io's
    ``aquasecurity/trivy-db``); ``--host`` names one host exactly. The CLI on a real cache dir."""
    import subprocess
    import sys
    import time

    import yaml

    data = tmp_path / "data"
    root = data / "cache"
    blobs = BlobStore(root, 10**9, 0, Metrics())
    blobs.open()
    entries = EntryStore(root, blobs, MemoryFrontSettings(), Metrics())
    entries.open()
    refs = {"m-db": "mirror.gcr.io/aquasec/trivy-db:2",
            "m-db-extra": "mirror.gcr.io/aquasec/trivy-db-extra:2",
            "g-db": "ghcr.io/aquasecurity/trivy-db:2",
            "r-db": "registry.corp:5000/aquasec/trivy-db@" + digest(b"x"),
            "m-java": "mirror.gcr.io/aquasec/trivy-java-db:1"}
    now = time.time()
    for name, ref in refs.items():
        body = blobs.put_bytes(name.encode())
        await entries.put(Entry(f"tag|https://{ref}|*/*|public", "oci_manifest", 200, [], body,
                                len(name), now, now + 60,
                                meta={"host": ref.split("/")[0], "reference": ref}))
    pom = blobs.put_bytes(b"<project/>")
    await entries.put(Entry("maven|https://repo.maven.apache.org/maven2/a/b/1/b-1.pom", "maven",
                            200, [], pom, 10, now, now + 60, meta={"host": "repo.maven.apache.org"}))
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"server": {"data_dir": str(data)}}))

    def purge(*args):
        out = subprocess.run([sys.executable, "-m", "gateway", "cache", "purge", *args,
                              "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stderr

    def left():
        return sorted(e.meta.get("reference") or e.key for e in entries.iter_entries())

    assert "removed 0 entries" in purge("--repo", "trivy-db")
    assert "removed 0 entries" in purge("--host", "gcr.io")
    assert "removed 2 entries" in purge("--repo", "aquasec/trivy-db")   # mirror + registry.corp
    assert refs["m-db"] not in left() and refs["r-db"] not in left()
    assert refs["m-db-extra"] in left() and refs["g-db"] in left()
    assert "removed 1 entries" in purge("--repo", "ghcr.io/aquasecurity/trivy-db")
    assert "removed 0 entries" in purge("--host", "ghcr.io", "--repo", "aquasec/trivy-java-db")
    assert "removed 1 entries" in purge("--host", "repo.maven.apache.org")
    assert left() == sorted([refs["m-db-extra"], refs["m-java"]])
