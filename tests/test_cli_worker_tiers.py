"""``cache …`` and ``bundle export`` on a data dir served by ``server.workers: N``.

Each worker is a replica with its own local tier ``<data_dir>/workers/<i>/cache``
(gateway/workers.py). The tiers are written here through the gateway's own stores (BlobStore,
EntryStore, with a real ``redis-server`` behind the memory front where the test is about
Redis), or filled by a real two-worker gateway; the commands run as subprocesses, as an
operator runs them.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import yaml

from gateway.cache import BlobStore, Entry, EntryStore
from gateway.cache.entries import PURGE_CHECK_INTERVAL, PURGE_MARKER, _MemoryFront
from gateway.observability.metrics import Metrics
from gateway.settings import MemoryFrontSettings
from tests.emulated.world import MAVEN
from tests.gateway_harness import free_port
from tests.scale_support import RedisServer
from tests.test_gateway_cache import get, until_purge_seen
from tests.test_lifecycle_bundle import export, populate, run_cli
from tests.test_scale_out import POM, redis_server, workers_gateway  # noqa: F401 - fixture

CENTRAL = "repo.maven.apache.org"
MAVEN_KEY = f"maven|https://{CENTRAL}/maven2/a/b/1/b-1.pom"
OTHER_KEY = "maven|https://maven.corp.example/releases/c/d/2/d-2.pom"


def open_tier(root: Path, front: MemoryFrontSettings | None = None):
    blobs = BlobStore(root, 10**9, 0, Metrics())
    blobs.open()
    entries = EntryStore(root, blobs, front or MemoryFrontSettings(), Metrics())
    entries.open()
    return blobs, entries


async def put(root: Path, key: str, body: bytes, front: MemoryFrontSettings | None = None) -> str:
    blobs, entries = open_tier(root, front)
    digest = blobs.put_bytes(body)
    now = time.time()
    await entries.put(Entry(key, "maven", 200, [], digest, len(body), now, now + 3600,
                            meta={"host": key.split("/")[2]}), body)
    await entries.front.cache.close()
    return digest


def keys_in(root: Path) -> set[str]:
    return {e.key for e in open_tier(root)[1].iter_entries()}


def worker(data: Path, i: int) -> Path:
    return data / "workers" / str(i) / "cache"


def write_config(tmp_path: Path, data: Path, **cache) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"server": {"data_dir": str(data)}, "cache": cache}))
    return path


@pytest.fixture
def three_tiers(tmp_path) -> Path:
    """The single-process tier (from before ``server.workers`` was set) and two workers' tiers:
    the Central POM in all three, another host's POM in worker 1 only."""
    data = tmp_path / "data"

    async def fill():
        await put(data / "cache", MAVEN_KEY, b"<project>main</project>")
        await put(worker(data, 0), MAVEN_KEY, b"<project>w0</project>")
        await put(worker(data, 1), MAVEN_KEY, b"<project>w1</project>")
        await put(worker(data, 1), OTHER_KEY, b"<project>other</project>")
    asyncio.run(fill())
    return data


def test_ls_and_stats_show_every_tier_and_which_tier_holds_an_entry(three_tiers):
    data = str(three_tiers)
    res = run_cli("cache", "ls", "--keys", "--data-dir", data)
    assert res.returncode == 0, res.stderr
    rows = sorted(tuple(line.split()[-2:]) for line in res.stdout.splitlines()[1:])
    assert rows == sorted([("main", MAVEN_KEY), ("worker-0", MAVEN_KEY), ("worker-1", MAVEN_KEY),
                           ("worker-1", OTHER_KEY)])
    res = run_cli("cache", "stats", "--data-dir", data)
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    assert (stats["entries"], stats["blobs"]) == (4, 4)
    assert [(t["tier"], t["entries"]) for t in stats["tiers"]] == \
        [("main", 1), ("worker-0", 1), ("worker-1", 2)]


def test_purge_by_host_removes_the_entry_from_every_tier_and_marks_each(three_tiers):
    data = three_tiers
    res = run_cli("cache", "purge", "--host", CENTRAL, "--data-dir", str(data))
    assert res.returncode == 0, res.stderr
    assert "removed 3 entries and 3 unreferenced blobs" in res.stderr, res.stderr
    assert "worker-1: 1 entries, 1 blobs" in res.stderr
    for root in (data / "cache", worker(data, 0), worker(data, 1)):
        assert MAVEN_KEY not in keys_in(root), root
        # the worker serving this tier sees the change within a second (its own marker)
        assert (root / "entries" / PURGE_MARKER).is_file(), root
    assert keys_in(worker(data, 1)) == {OTHER_KEY}
    assert open_tier(worker(data, 0))[0].count == 0


def test_a_data_dir_with_only_workers_tiers_is_a_cache(tmp_path):
    """Before: ``no gateway cache`` (exit 1) for a data dir only a worker supervisor served."""
    data = tmp_path / "data"
    asyncio.run(put(worker(data, 0), MAVEN_KEY, b"<project/>"))
    res = run_cli("cache", "purge", "--all", "--data-dir", str(data))
    assert res.returncode == 0, res.stderr
    assert keys_in(worker(data, 0)) == set()
    res = run_cli("cache", "verify", "--data-dir", str(data))
    assert res.returncode == 0 and "verified 0 blobs" in res.stderr, res.stderr


def test_purge_removes_the_keys_from_the_shared_redis_front(tmp_path, redis_server):
    """The Redis front outlives the gateways: without this, a worker started after the purge
    would serve the purged POM (small body included) from Redis."""
    data = tmp_path / "data"
    front = MemoryFrontSettings(backend="redis", redis_url=redis_server.url)

    async def fill():
        await put(worker(data, 0), MAVEN_KEY, b"<project>w0</project>", front)
        await put(worker(data, 1), OTHER_KEY, b"<project>other</project>", front)
    asyncio.run(fill())

    async def in_redis() -> set[str]:
        cache = _MemoryFront(front).cache
        try:
            return {k for k in (MAVEN_KEY, OTHER_KEY) if await cache.get(k) is not None}
        finally:
            await cache.close()
    assert asyncio.run(in_redis()) == {MAVEN_KEY, OTHER_KEY}
    config = write_config(tmp_path, data, shared={"redis_url": redis_server.url})
    res = run_cli("cache", "purge", "--host", CENTRAL, "--config", str(config))
    assert res.returncode == 0, res.stderr
    assert "removed 1 keys from the shared Redis front" in res.stderr
    assert "other machines" in res.stderr            # what this purge cannot reach is said
    assert asyncio.run(in_redis()) == {OTHER_KEY}


def test_a_gateway_seeing_the_purge_marker_keeps_the_fleets_state_in_redis(tmp_path,
                                                                          redis_server):
    """A worker that sees its tier's purge marker forgets its memory; before, it cleared the
    Redis front with aiocache's ``clear``: a FLUSHDB wiping every replica's circuits, leases,
    budget and peer token (and any other data in that database)."""
    import redis

    data = tmp_path / "data"
    front = MemoryFrontSettings(backend="redis", redis_url=redis_server.url)
    asyncio.run(put(worker(data, 0), MAVEN_KEY, b"<project>w0</project>", front))
    client = redis.Redis(port=redis_server.port)
    client.set("trivy-gateway:circuit:maven.example", "open")
    client.set("another-application:key", "1")
    config = write_config(tmp_path, data, shared={"redis_url": redis_server.url})

    async def serving_worker() -> tuple:
        now = [0.0]
        blobs = BlobStore(worker(data, 0), 10**9, 0, Metrics())
        blobs.open()
        entries = EntryStore(worker(data, 0), blobs, front, Metrics(), monotonic=lambda: now[0])
        entries.open()
        try:
            res = await asyncio.to_thread(run_cli, "cache", "purge", "--host", CENTRAL,
                                          "--config", str(config))
            now[0] += PURGE_CHECK_INTERVAL        # the worker's next look at its marker
            return res, await entries.get(MAVEN_KEY)
        finally:
            await entries.front.cache.close()
    res, served = asyncio.run(serving_worker())
    assert res.returncode == 0, res.stderr
    assert served is None
    assert client.get("trivy-gateway:circuit:maven.example") == b"open"
    assert client.get("another-application:key") == b"1"


def test_purge_says_so_and_fails_when_the_shared_redis_front_is_unreachable(three_tiers, tmp_path):
    config = write_config(tmp_path, three_tiers,
                          shared={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    res = run_cli("cache", "purge", "--host", CENTRAL, "--config", str(config))
    assert res.returncode == 1, res.stderr
    assert "shared Redis front" in res.stderr and "was not purged" in res.stderr, res.stderr
    assert MAVEN_KEY not in keys_in(worker(three_tiers, 0))   # the local tiers were purged


def test_bundle_export_reads_the_workers_tiers(tmp_path):
    """The trivy-db generation was served by worker 1: before, the export found nothing."""
    data = tmp_path / "data"
    populate(data / "workers" / "1")
    out = tmp_path / "b.tar"
    res = export(data, out)
    assert "artifact vulnerability_db" in res.stderr
    assert out.is_file()


async def test_purge_beside_a_running_two_worker_gateway(clean_upstreams, make_gateway,
                                                        redis_server):
    """A real ``server.workers: 2`` gateway: after ``cache purge --host`` no worker serves the
    POM from its tier, its memory or Redis; it is fetched from the upstream again."""
    world = clean_upstreams
    gw, _ = workers_gateway(make_gateway, world, redis_server, name="purge-")
    url = f"https://{MAVEN}{POM}"
    for _ in range(4):                      # connections spread over both workers
        status, headers, body = await get(gw, url)
        assert status == 200
    assert len(world.requests(host=MAVEN)) == 1
    held = [i for i in (0, 1) if any(keys_in(worker(gw.data_dir, i)))]
    assert held, "no worker's tier holds the POM"
    world.clear_log()
    res = await asyncio.to_thread(run_cli, "cache", "purge", "--host", MAVEN, "--config",
                                  str(gw.config_path))
    assert res.returncode == 0 and "removed 1 keys from the shared Redis front" in res.stderr, \
        res.stderr
    for i in held:
        assert not keys_in(worker(gw.data_dir, i))
    await until_purge_seen(gw, url, body)   # each worker checks its own tier's marker
    assert len(world.requests(host=MAVEN)) == 1


def test_bundle_import_with_workers_reaches_every_workers_tier(tmp_path):
    """Each worker serves only its own tier: an import into ``<data_dir>/cache`` (before) was
    served by no worker of an air-gapped ``server.workers: 2`` gateway."""
    src, data = tmp_path / "src", tmp_path / "data"
    tag_key = populate(src)["tag_key"]
    out = tmp_path / "b.tar"
    export(src, out)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"data_dir": str(data), "workers": 2},
        "cache": {"shared": {"redis_url": f"redis://127.0.0.1:{free_port()}/0"}}}))
    res = run_cli("bundle", "import", "--config", str(config), str(out))
    assert res.returncode == 0, res.stderr
    imported = keys_in(worker(data, 0))
    assert tag_key in imported and keys_in(worker(data, 1)) == imported
    assert not (data / "cache").exists()
    res = run_cli("cache", "verify", "--config", str(config))
    assert res.returncode == 0 and "verified 4 blobs" in res.stderr, res.stderr
