"""TTL semantics of the pipeline with an injected clock: expiry, revalidation, stale serving,
refresh-ahead, RFC 9111 lifetimes. Real parts throughout (blob and entry stores on disk, the
upstream client over real TLS to the emulated world on this loop); only the clock the pipeline
reads for freshness is moved by the test instead of sleeping for a TTL."""
from __future__ import annotations

import asyncio
import hashlib

import pytest
from multidict import CIMultiDict

from gateway.cache import BlobStore, EntryStore
from gateway.cache.keyformat import migrate_keys
from gateway.exchange import Exchange
from gateway.observability.metrics import Metrics
from gateway.pipeline.handler import Pipeline
from gateway.resources.legacy import KEY_UPGRADE
from gateway.settings import load_settings
from gateway.upstream.client import UpstreamClient
from tests.emulated.world import API_GITHUB, CHECK, CODELOAD, GHCR, GITHUB, MIRROR, World
from tests.gateway_harness import deep_merge

MANIFEST_ACCEPT = ("application/vnd.oci.image.manifest.v1+json,"
                   "application/vnd.docker.distribution.manifest.v2+json")


class Clock:
    """Wall time as the pipeline sees it; the test moves it."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    def __init__(self, world: World, tmp_path, extra: dict) -> None:
        cfg = {"server": {"data_dir": str(tmp_path / "data")},
               "upstream": {"ca_bundle": str(world.ca_pem),
                            "address_overrides": dict(world.address_overrides),
                            "retry": {"attempts": 1, "base_delay": "0.05s"},
                            "connect_timeout": "3s", "read_timeout": "5s"},
               "cache": {"min_free_space": 0}}
        self.settings = load_settings(env={}, overrides=deep_merge(cfg, extra))
        self.metrics = Metrics()
        root = tmp_path / "data" / "cache"
        self.blobs = BlobStore(root, self.settings.cache.max_size, 0, self.metrics)
        self.blobs.open()
        #: the entry store's monotonic clock (purge-marker checks), moved by the test
        self.mono = Clock(0.0)
        self.entries = EntryStore(root, self.blobs, self.settings.cache.memory, self.metrics,
                                  monotonic=self.mono)
        #: the start-up sequence of gateway.app: older keys migrated, then the store opened
        self.key_migration = migrate_keys(self.entries, KEY_UPGRADE)
        self.entries.open()
        self.upstream = UpstreamClient(self.settings.upstream, self.metrics)
        self.clock = Clock()
        self.pipeline = Pipeline(self.settings, self.blobs, self.entries, self.upstream,
                                 self.metrics, clock=self.clock)

    async def get(self, host: str, target: str, **headers: str):
        ex = Exchange("GET", "https", host, 443, target, CIMultiDict(headers))
        resp = await self.pipeline.handle(ex)
        try:
            body = b"".join([c async for c in resp.body.chunks()])
        finally:
            await resp.body.close()
        return resp.status, resp.headers, body, ex.notes.get("cache")

    async def purge_as_operator(self) -> None:
        """What ``trivy-gateway cache purge`` does from another process: every entry deleted
        through its own EntryStore, then the purge marker touched (the test moves ``mono``)."""
        other = EntryStore(self.settings.data_dir / "cache", self.blobs,
                           self.settings.cache.memory, Metrics())
        other.open()
        for e in list(other.iter_entries()):
            await other.delete(e.key)
        other.mark_purged()

    async def background_done(self) -> None:
        """Wait (bounded) for background refreshes the pipeline started."""
        for _ in range(200):
            if not self.pipeline._background:  # noqa: SLF001 - test observes the job set
                return
            await asyncio.gather(*list(self.pipeline._background), return_exceptions=True)  # noqa: SLF001
        raise AssertionError("background fetches did not finish")


@pytest.fixture
async def world(tmp_path):
    async with World(tmp_path / "world", db_size_mib=1) as w:
        yield w


@pytest.fixture
async def make(world, tmp_path):
    made: list[Harness] = []

    async def factory(extra: dict | None = None, name: str | None = None) -> Harness:
        """``name``: the directory under tmp_path (a later call with the same name opens the
        same data dir again, as a restart does)."""
        h = Harness(world, tmp_path / (name or f"h{len(made)}"), extra or {})
        await h.upstream.start()
        made.append(h)
        return h

    yield factory
    for h in made:
        await h.pipeline.close()
        await h.upstream.close()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


TAG = "/v2/aquasec/trivy-db/manifests/2"


async def test_tag_manifest_fresh_then_served_stale_when_upstream_down(world, make):
    h = await make({"cache": {"oci": {"tag_ttl": {"aquasec/trivy-db": "60s"}}}})
    status, _, manifest, result = await h.get(MIRROR, TAG, Accept=MANIFEST_ACCEPT)
    assert (status, result) == (200, "miss") and sha(manifest) == world.digest("db")
    h.clock.advance(59)
    assert (await h.get(MIRROR, TAG, Accept=MANIFEST_ACCEPT))[3] == "hit"
    h.clock.advance(2)                                   # expired
    await world.refuse(MIRROR)
    await world.refuse(GHCR)                             # its failover partner too
    status, headers, body, result = await h.get(MIRROR, TAG, Accept=MANIFEST_ACCEPT)
    assert (status, result, body) == (200, "stale", manifest)
    assert "detail=stale" in headers["Cache-Status"]
    assert h.pipeline.artifacts["vulnerability_db"]["age_seconds"] == pytest.approx(61)
    h.clock.advance(7 * 86400)                           # past cache.max_stale: not served
    status, _, _, result = await h.get(MIRROR, TAG, Accept=MANIFEST_ACCEPT)
    assert status >= 500 and result == "error"


async def test_expired_tag_is_revalidated_with_one_request(world, make):
    h = await make({"cache": {"oci": {"tag_ttl": {"aquasec/trivy-checks": "10s"}}}})
    target = "/v2/aquasec/trivy-checks/manifests/2"
    _, _, manifest, _ = await h.get(MIRROR, target, Accept=MANIFEST_ACCEPT)
    h.clock.advance(11)
    world.clear_log()
    status, headers, body, result = await h.get(MIRROR, target, Accept=MANIFEST_ACCEPT)
    assert status == 200 and body == manifest and result in ("revalidated", "miss")
    reqs = world.requests(host=MIRROR, path_contains="/manifests/")
    assert len(reqs) == 1 and reqs[0].status in (200, 304)
    assert (await h.get(MIRROR, target, Accept=MANIFEST_ACCEPT))[3] == "hit"   # fresh again


async def test_tag_refreshed_in_background_before_expiry(world, make):
    h = await make({"cache": {"oci": {"tag_ttl": {"aquasec/trivy-checks": "100s"},
                                      "refresh_ahead": 0.3}}})
    target = "/v2/aquasec/trivy-checks/manifests/2"
    await h.get(MIRROR, target, Accept=MANIFEST_ACCEPT)
    h.clock.advance(20)                                  # < 30 % of the TTL: nothing to do
    world.clear_log()
    assert (await h.get(MIRROR, target, Accept=MANIFEST_ACCEPT))[3] == "hit"
    await h.background_done()
    assert world.requests(host=MIRROR, path_contains="/manifests/") == []
    h.clock.advance(20)                                  # 40 %: a hit, refreshed behind it
    status, headers, _, result = await h.get(MIRROR, target, Accept=MANIFEST_ACCEPT)
    assert (status, result) == (200, "hit")
    await h.background_done()
    assert len(world.requests(host=MIRROR, path_contains="/manifests/")) == 1
    h.clock.advance(70)            # past the first fetch's expiry, not the refreshed entry's
    status, headers, _, result = await h.get(MIRROR, target, Accept=MANIFEST_ACCEPT)
    assert (status, result) == (200, "hit") and headers["Cache-Status"].startswith(
        "trivy-gateway; hit; ttl=")


async def test_generic_max_age_and_expires_follow_the_clock(world, make):
    """RFC 9111 lifetimes of a generic host, timed by the injected clock (``Expires`` too)."""
    h = await make({"policy": {"rules": [{"host": CHECK, "action": "intercept"}]}})
    world.fail_status(CHECK, 200, path="^/a$", times=None, body=b"a", content_type="text/plain",
                      headers=[("Cache-Control", "max-age=30")])
    import email.utils
    expires = email.utils.formatdate(h.clock() + 50, usegmt=True)
    world.fail_status(CHECK, 200, path="^/b$", times=None, body=b"b", content_type="text/plain",
                      headers=[("Expires", expires)])
    for target in ("/a", "/b"):
        assert (await h.get(CHECK, target))[3] == "miss"
    h.clock.advance(29)
    assert [(await h.get(CHECK, t))[3] for t in ("/a", "/b")] == ["hit", "hit"]
    h.clock.advance(2)                                   # /a expired at 30 s, /b lives to 50 s
    assert [(await h.get(CHECK, t))[3] for t in ("/a", "/b")] == ["miss", "hit"]
    h.clock.advance(20)
    assert (await h.get(CHECK, "/b"))[3] == "miss"


async def test_vary_variant_never_served_stale_or_coalesced_to_another_client(world, make):
    """D5: a ``Vary: Cookie`` response fetched with alice's cookie is neither served stale to a
    client without it when the origin fails, nor handed to one coalesced on alice's fetch."""
    h = await make({"policy": {"rules": [{"host": CHECK, "action": "intercept"}]}})
    vary = [("Cache-Control", "max-age=30"), ("Vary", "Cookie")]
    world.fail_status(CHECK, 200, path="^/v$", times=1, body=b"alice", content_type="text/plain",
                      headers=vary)
    assert (await h.get(CHECK, "/v", Cookie="u=alice"))[2:] == (b"alice", "miss")
    h.clock.advance(31)
    world.fail_status(CHECK, 503, path="^/v$", times=None, body=b"down")
    assert (await h.get(CHECK, "/v", Cookie="u=alice"))[2:] == (b"alice", "stale")
    status, _, body, _ = await h.get(CHECK, "/v")
    assert status == 503 and body != b"alice"
    world.clear_faults(CHECK)
    # coalescing: bob's request arrives while alice's fetch is in flight
    world.fail_status(CHECK, 200, path="^/w$", times=1, body=b"alice", content_type="text/plain",
                      headers=vary)
    world.fail_status(CHECK, 200, path="^/w$", times=1, body=b"bob", content_type="text/plain",
                      headers=vary)
    world.delay(CHECK, 0.5, path="^/w$", times=1)       # holds alice's fetch (not a timing check)
    alice = asyncio.create_task(h.get(CHECK, "/w", Cookie="u=alice"))
    for _ in range(200):
        if h.pipeline._jobs:                             # noqa: SLF001 - alice's fetch started
            break
        await asyncio.sleep(0.005)
    assert h.pipeline._jobs                              # noqa: SLF001
    bob = await h.get(CHECK, "/w", Cookie="u=bob")
    assert (await alice)[2] == b"alice" and bob[2] == b"bob"
    assert len(world.requests(host=CHECK, path_contains="/w")) == 2


async def test_try_hit_answers_fresh_memory_hits_as_handle_does_and_declines_the_rest(world, make):
    """``Pipeline.try_hit`` (the proxy's synchronous first ask) gives exactly ``handle``'s answer
    for a fresh in-memory hit, and None — never another answer — for a miss, another Vary
    variant, an expired entry, or while an operator's purge is not yet checked for."""
    h = await make({"policy": {"rules": [{"host": CHECK, "action": "intercept"}]}})
    world.fail_status(CHECK, 200, path="^/a$", times=None, body=b"a-body",
                      content_type="text/plain", headers=[("Cache-Control", "max-age=30")])
    world.fail_status(CHECK, 200, path="^/v$", times=None, body=b"alice",
                      content_type="text/plain",
                      headers=[("Cache-Control", "max-age=30"), ("Vary", "Cookie")])

    def ask(target: str, **headers: str):
        ex = Exchange("GET", "https", CHECK, 443, target, CIMultiDict(headers))
        return ex, h.pipeline.try_hit(ex)

    ex, quick = ask("/a")
    assert quick is None and "cache" not in ex.notes       # a miss: not counted, not answered
    assert (await h.get(CHECK, "/a"))[2:] == (b"a-body", "miss")
    via_handle = await h.get(CHECK, "/a")
    h.clock.advance(5)
    ex, quick = ask("/a")
    assert quick is not None and ex.notes["cache"] == "hit"
    assert (quick.status, quick.body.data) == (via_handle[0], via_handle[2]) == (200, b"a-body")
    assert quick.headers["Cache-Status"].startswith("trivy-gateway; hit")
    assert quick.head is not None and b"Age: 5\r\n" in quick.head

    await h.get(CHECK, "/v", Cookie="u=alice")
    assert ask("/v", Cookie="u=alice")[1] is not None
    assert ask("/v", Cookie="u=bob")[1] is None            # another variant: handle() decides

    # an operator purge (another process: entry gone, marker touched) is seen by handle()
    # once the check is due; try_hit must not answer from memory in the meantime
    await h.purge_as_operator()
    h.mono.advance(1.5)                                    # PURGE_CHECK_INTERVAL has passed
    assert ask("/a")[1] is None
    assert (await h.get(CHECK, "/a"))[3] == "miss"
    assert ask("/a")[1] is not None                        # refilled, checked: answered again

    h.clock.advance(31)                                    # expired: not answered here
    assert ask("/a")[1] is None
    assert (await h.get(CHECK, "/a"))[3] == "miss"


VEX_ARCHIVE = "/aquasecurity/vexhub/archive/refs/heads/main.tar.gz"
VEX_CODELOAD = "/aquasecurity/vexhub/tar.gz/refs/heads/main"
VEX_CONTENTS = "/repos/aquasecurity/vexhub/contents/"


async def test_vex_archive_freshness_is_set_apart_from_other_github_traffic(world, make):
    """cache.github.archive_ttl: the VEX archive (the github.com redirect and the codeload
    body) is revalidated after its own 10 minutes, while the API listing stays fresh for the
    24 h of cache.github.ttl; a new VEX Hub revision reaches clients within archive_ttl."""
    h = await make({"cache": {"github": {"ttl": "24h", "archive_ttl": "10m"}}})
    api = {"accept": "application/vnd.github.v3+json", "x-github-api-version": "2022-11-28"}
    assert (await h.get(GITHUB, VEX_ARCHIVE))[0] == 302
    status, _, first, result = await h.get(CODELOAD, VEX_CODELOAD)
    assert (status, result) == (200, "miss")
    assert (await h.get(API_GITHUB, VEX_CONTENTS, **api))[3] == "miss"

    world.publish_vex(2)
    h.clock.advance(9 * 60)                   # within both TTLs: the old archive, from cache
    assert (await h.get(CODELOAD, VEX_CODELOAD))[2:] == (first, "hit")
    h.clock.advance(2 * 60)                   # past archive_ttl, far within ttl
    world.clear_log()
    assert (await h.get(GITHUB, VEX_ARCHIVE))[0::3] == (302, "miss")   # no validator: refetched
    status, _, second, result = await h.get(CODELOAD, VEX_CODELOAD)
    assert (status, result) == (200, "miss") and second != first       # ETag changed: new body
    assert (await h.get(API_GITHUB, VEX_CONTENTS, **api))[3] == "hit"
    world.wait_idle(10)
    asked = [(e.host, e.request_headers.get("if-none-match")) for e in world.requests()]
    assert asked == [(GITHUB, None), (CODELOAD, '"' + hashlib.sha1(first).hexdigest() + '"')], \
        world.log_summary()
