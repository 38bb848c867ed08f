"""The gateway as a whole (subprocess, real sockets, real TLS) against the emulated upstreams:
caching, coalescing, verification, stale serving, crash safety. Upstream request counts come
from the emulated servers' own access log."""
from __future__ import annotations

import asyncio
import hashlib
import time

import aiohttp
import pytest

from tests.emulated.world import CDN, CHECK, CODELOAD, GHCR, GITHUB, MAVEN, MIRROR, RAW_GITHUB

MANIFEST_ACCEPT = ("application/vnd.oci.image.manifest.v1+json,"
                   "application/vnd.docker.distribution.manifest.v2+json")


def blob_path(world, kind="db", registry=MIRROR):
    repo = {"db": ("aquasec/trivy-db", "aquasecurity/trivy-db"),
            "javadb": ("aquasec/trivy-java-db", "aquasecurity/trivy-java-db"),
            "checks": ("aquasec/trivy-checks", "aquasecurity/trivy-checks")}[kind]
    name = repo[0] if registry == MIRROR else repo[1]
    return f"/v2/{name}/blobs/{world.digest(kind, 'layer')}"


async def get(gw, url, *, method="GET", headers=None, session=None, read=True):
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.request(method, url, proxy=gw.proxy_url, ssl=gw.client_ssl(),
                                   headers=headers or {}, allow_redirects=False,
                                   auto_decompress=False) as r:
            body = await r.read() if read else b""
            return r.status, r.headers, body
    finally:
        if own:
            await session.close()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_blob_cold_then_warm_makes_zero_upstream_requests(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world)
    url = f"https://{MIRROR}{blob_path(world)}"
    status, headers, body = await get(gw, url)
    assert status == 200 and sha(body) == world.digest("db", "layer")
    assert "fwd=uri-miss" in headers["Cache-Status"]
    assert len(world.requests(host=MIRROR, path_contains="/blobs/")) == 1
    world.clear_log()
    status, headers, body2 = await get(gw, url)
    assert status == 200 and body2 == body
    assert headers["Cache-Status"].startswith("trivy-gateway; hit")
    assert headers["Docker-Content-Digest"] == world.digest("db", "layer")
    assert int(headers["Content-Length"]) == len(body)
    assert world.requests() == []  # nothing at all reached any upstream


async def test_ghcr_redirect_followed_by_gateway_and_shared_with_mirror(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world)
    status, headers, body = await get(gw, f"https://{GHCR}{blob_path(world, 'javadb', GHCR)}")
    assert status == 200, body[:200]  # the client never sees the 307
    assert sha(body) == world.digest("javadb", "layer")
    assert len(world.requests(host=CDN)) == 1
    world.clear_log()
    # the same digest requested from the other registry is a hit: identical public artifact
    status, headers, body2 = await get(gw, f"https://{MIRROR}{blob_path(world, 'javadb', MIRROR)}")
    assert status == 200 and body2 == body and "hit" in headers["Cache-Status"]
    assert world.requests() == []


async def test_eight_concurrent_cold_clients_one_upstream_fetch_streaming(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world)
    size = len(world.published["db"].layer.data) if hasattr(world.published["db"].layer, "data") else None
    # slow the upstream so the fill takes a few seconds and followers must stream, not wait
    world.throttle(MIRROR, 25 * 1024 * 1024, path="/blobs/")
    url = f"https://{MIRROR}{blob_path(world)}"
    first_byte: list[float] = []
    done: list[float] = []
    digests: list[str] = []

    async def client():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as s:
            async with s.get(url, proxy=gw.proxy_url, ssl=gw.client_ssl()) as r:
                assert r.status == 200
                h = hashlib.sha256()
                first = True
                async for chunk in r.content.iter_chunked(256 * 1024):
                    if first:
                        first_byte.append(time.monotonic())
                        first = False
                    h.update(chunk)
                done.append(time.monotonic())
                digests.append("sha256:" + h.hexdigest())

    await asyncio.gather(*(client() for _ in range(8)))
    assert digests == [world.digest("db", "layer")] * 8
    assert len(world.requests(host=MIRROR, path_contains="/blobs/")) == 1
    # every client got its first byte before the fill completed (no one waited for the whole blob)
    assert max(first_byte) < min(done)
    assert gw.metric("trivy_gateway_cache_requests_total", result="coalesced") == 7
    del size


async def test_corrupted_upstream_body_is_never_stored(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world)
    world.corrupt_byte(MIRROR, 1000, path="/blobs/", times=1)
    url = f"https://{MIRROR}{blob_path(world, 'checks')}"
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        await get(gw, url)  # the client is cut off rather than handed bad bytes as complete
    assert gw.metric("trivy_gateway_cache_digest_mismatches_total") == 1
    status, headers, body = await get(gw, url)  # fetched again, correctly this time
    assert status == 200 and sha(body) == world.digest("checks", "layer")
    assert "fwd=uri-miss" in headers["Cache-Status"]
    assert len(world.requests(host=MIRROR, path_contains="/blobs/")) == 2


async def test_range_and_conditional_requests_on_hits(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world)
    url = f"https://{MIRROR}{blob_path(world, 'checks')}"
    _, _, full = await get(gw, url)
    status, headers, part = await get(gw, url, headers={"Range": "bytes=10-99"})
    assert status == 206 and part == full[10:100]
    assert headers["Content-Range"] == f"bytes 10-99/{len(full)}"
    status, headers, _ = await get(gw, url, headers={"Range": f"bytes={len(full) + 5}-"})
    assert status == 416
    etag = headers.get("ETag") or f'"{world.digest("checks", "layer")}"'
    status, _, body = await get(gw, url, headers={"If-None-Match": etag})
    assert status == 304 and body == b""
    status, headers, body = await get(gw, url, method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(full)


async def test_kill_during_fill_then_restart_serves_nothing_partial(clean_upstreams, make_gateway, tmp_path):
    world = clean_upstreams
    data_dir = tmp_path / "shared-data"
    gw = make_gateway(world, data_dir=data_dir)
    world.throttle(MIRROR, 5 * 1024 * 1024, path="/blobs/")
    url = f"https://{MIRROR}{blob_path(world)}"

    async def partial():
        async with aiohttp.ClientSession() as s:
            async with s.get(url, proxy=gw.proxy_url, ssl=gw.client_ssl()) as r:
                got = 0
                async for chunk in r.content.iter_chunked(65536):
                    got += len(chunk)
                    if got > 3 * 1024 * 1024 and gw.proc.poll() is None:
                        gw.kill()  # kill -9 in the middle of the fill; reading on must fail
                return got

    with pytest.raises(aiohttp.ClientError):
        await partial()
    world.clear_faults()
    gw2 = make_gateway(world, data_dir=data_dir)
    world.clear_log()
    status, headers, body = await get(gw2, url)
    assert status == 200 and sha(body) == world.digest("db", "layer")
    assert "fwd=uri-miss" in headers["Cache-Status"]  # nothing partial was kept as a hit
    assert len(world.requests(host=MIRROR, path_contains="/blobs/")) == 1


async def test_restart_keeps_cache_warm_and_upstream_down_still_serves(clean_upstreams, make_gateway, tmp_path):
    world = clean_upstreams
    data_dir = tmp_path / "warm"
    gw = make_gateway(world, data_dir=data_dir)
    url = f"https://{MIRROR}{blob_path(world, 'checks')}"
    _, _, body = await get(gw, url)
    assert gw.stop() == 0
    for host in (MIRROR, GHCR, CDN):
        world.refuse(host)
    gw2 = make_gateway(world, data_dir=data_dir)
    status, headers, body2 = await get(gw2, url)
    assert status == 200 and body2 == body and "hit" in headers["Cache-Status"]


async def test_maven_release_cached_404_negative_429_passed_not_cached(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world)
    pom = f"https://{MAVEN}/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom"
    missing = f"https://{MAVEN}/maven2/org/example/nothing/9.9/nothing-9.9.pom"
    status, _, body = await get(gw, pom)
    assert status == 200 and b"<project" in body
    status, _, _ = await get(gw, missing)
    assert status == 404
    world.clear_log()
    assert (await get(gw, pom))[0] == 200
    status, headers, _ = await get(gw, missing)
    assert status == 404 and "hit" in headers["Cache-Status"]  # negative entry
    assert world.requests(host=MAVEN) == []
    other = f"https://{MAVEN}/maven2/org/example/demo/demo-transitive/0.9.0/demo-transitive-0.9.0.pom"
    world.too_many_requests(MAVEN, path="demo-transitive", times=1, retry_after=1800, style="plain")
    status, headers, _ = await get(gw, other)
    assert status == 429 and headers.get("Retry-After")
    # the circuit is open now: cached POMs still served, nothing reaches Maven
    world.clear_log()
    assert (await get(gw, pom))[0] == 200
    status, headers, body = await get(gw, other)
    assert status == 429 and 1700 <= int(headers["Retry-After"]) <= 1800
    assert b"repo.maven.apache.org" in body
    assert world.requests(host=MAVEN) == []
    # the status page shows the open circuit
    maven = gw.status()["upstreams"][MAVEN]
    assert maven["circuit"] == "open" and maven["open_remaining"] > 1700
    assert gw.metric("trivy_gateway_upstream_circuit_state", host=MAVEN) == 2


async def test_vex_archive_redirect_cached_and_client_etag_gets_304(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world)
    status, headers, _ = await get(gw, f"https://{GITHUB}/aquasecurity/vexhub/archive/refs/heads/main.tar.gz")
    assert status == 302 and CODELOAD in headers["Location"]
    status, headers, archive = await get(gw, headers["Location"])
    assert status == 200 and archive
    etag = headers["ETag"]
    world.clear_log()
    status, headers, body = await get(gw, f"https://{CODELOAD}/aquasecurity/vexhub/tar.gz/refs/heads/main",
                                      headers={"If-None-Match": etag})
    assert status == 304 and body == b""
    assert world.requests(host=CODELOAD) == []


async def test_size_cap_degrades_to_pass_through(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world, {"cache": {"max_size": "1MiB"}})
    url = f"https://{MIRROR}{blob_path(world)}"  # far larger than the budget
    for _ in range(2):
        status, headers, body = await get(gw, url)
        assert status == 200 and sha(body) == world.digest("db", "layer")
    assert len(world.requests(host=MIRROR, path_contains="/blobs/")) == 2


async def test_blob_failover_to_ghcr_when_mirror_refuses(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world)
    world.refuse(MIRROR)
    status, headers, body = await get(gw, f"https://{MIRROR}{blob_path(world, 'checks')}")
    assert status == 200 and sha(body) == world.digest("checks", "layer")
    assert len(world.requests(host=GHCR, path_contains="/blobs/")) == 1
    assert gw.metric("trivy_gateway_upstream_failovers_total") == 1


async def test_cache_cli_stats_ls_verify_purge(clean_upstreams, make_gateway):
    import json
    import subprocess
    import sys

    world = clean_upstreams
    gw = make_gateway(world)
    await get(gw, f"https://{MIRROR}{blob_path(world, 'checks')}")
    await get(gw, f"https://{MAVEN}/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom")
    gw.stop()

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "gateway", "cache", *args, "--config",
                               str(gw.config_path)], capture_output=True, text=True, timeout=60)

    stats = json.loads(cli("stats").stdout)
    assert stats["blobs"] == 2 and stats["entries"] == 2
    listing = cli("ls").stdout
    assert "oci_blob" in listing and "maven" in listing
    assert cli("verify").returncode == 0
    out = cli("purge", "--host", MAVEN)
    assert out.returncode == 0 and "removed 1 entries and 1 unreferenced blobs" in out.stderr
    stats = json.loads(cli("stats").stdout)
    assert stats["entries"] == 1 and stats["blobs"] == 1
    # corrupt the remaining blob on disk: verify finds it, removes it, and exits non-zero
    blob = next(p for p in (gw.data_dir / "cache" / "blobs" / "sha256").rglob("*") if p.is_file())
    blob.write_bytes(b"garbage")
    bad = cli("verify")
    assert bad.returncode == 1 and "sha256:" in bad.stdout
    assert json.loads(cli("stats").stdout)["blobs"] == 0


async def until_purge_seen(gw, url: str, body: bytes) -> None:
    """Ask until the answer is no longer a hit (bounded: a gateway looks at the purge marker
    once a second), then check it is the same body, fetched anew."""
    for _ in range(100):
        status, headers, again = await get(gw, url)
        if "hit" not in headers["Cache-Status"]:
            break
        await asyncio.sleep(0.05)
    assert status == 200 and again == body
    assert "hit" not in headers["Cache-Status"], headers["Cache-Status"]


async def test_purge_while_running_takes_effect(clean_upstreams, make_gateway):
    """``cache purge`` runs beside a live gateway: within a second the gateway stops serving
    what was purged, including small bodies it held in memory."""
    import subprocess
    import sys

    world = clean_upstreams
    gw = make_gateway(world)
    url = f"https://{MAVEN}/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom"
    await get(gw, url)
    status, headers, body = await get(gw, url)
    assert status == 200 and headers["Cache-Status"].startswith("trivy-gateway; hit")
    world.clear_log()
    out = subprocess.run([sys.executable, "-m", "gateway", "cache", "purge", "--host", MAVEN,
                          "--config", str(gw.config_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "removed 1 entries" in out.stderr, out.stderr
    await until_purge_seen(gw, url, body)
    assert len(world.requests(host=MAVEN)) == 1  # fetched anew after the purge
    status, headers, _ = await get(gw, url)      # and cached again
    assert headers["Cache-Status"].startswith("trivy-gateway; hit")


async def test_disk_failure_mid_fill_still_serves_clients_intact(clean_upstreams, make_gateway):
    """The cache's disk fails after ~20 MiB of a 60 MiB fill (RLIMIT_FSIZE on the gateway:
    writes fail like a full disk). Every client still gets the whole, correct blob (finished
    from the upstream with Range), nothing is stored, and the failure is counted."""
    world = clean_upstreams
    gw = make_gateway(world, fsize_limit=20 * 1024 * 1024)
    world.throttle(MIRROR, 40 * 1024 * 1024, path="/blobs/")
    url = f"https://{MIRROR}{blob_path(world)}"
    results = await asyncio.gather(*(get(gw, url) for _ in range(3)))
    for status, headers, body in results:
        assert status == 200 and sha(body) == world.digest("db", "layer")
    assert gw.metric("trivy_gateway_cache_store_errors_total") >= 1
    world.clear_log()
    status, headers, body = await get(gw, url)  # not stored: fetched again
    assert status == 200 and sha(body) == world.digest("db", "layer")
    assert "hit" not in headers["Cache-Status"]
    ranged = [r for r in world.requests(host=MIRROR, path_contains="/blobs/")]
    assert len(ranged) >= 1


async def test_private_repository_content_never_served_without_the_credentials(clean_upstreams, make_gateway):
    """A repository not marked public is fetched with the client's own token and cached per
    credential: another client without it is not served from that cache entry."""
    world = clean_upstreams
    gw = make_gateway(world, {"cache": {"oci": {"public_repositories": [
        "mirror.gcr.io/aquasec/trivy-db"]}}})  # trivy-checks is "private" here
    url = f"https://{MIRROR}{blob_path(world, 'checks')}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://{MIRROR}/v2/token?scope=repository:aquasec/trivy-checks:pull"
                         f"&service={MIRROR}", proxy=gw.proxy_url, ssl=gw.client_ssl()) as r:
            token = (await r.json())["token"]
    auth = {"Authorization": f"Bearer {token}"}
    status, _, body = await get(gw, url, headers=auth)
    assert status == 200 and sha(body) == world.digest("checks", "layer")
    status, headers, _ = await get(gw, url, headers=auth)
    assert status == 200 and "hit" in headers["Cache-Status"]  # same credential: a hit
    world.clear_log()
    status, headers, _ = await get(gw, url)  # no credential: not from the cache
    assert status == 401 and "hit" not in headers["Cache-Status"]
    assert len(world.requests(host=MIRROR, path_contains="/blobs/")) == 1


async def _plain_origin(body: bytes, headers: dict[str, str]):
    """A plain-HTTP origin on loopback (an on-path attacker's port 80): every request gets
    ``body``. Returns (server, port, requests seen)."""
    seen: list[bytes] = []

    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen.append(head)
                lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                writer.write(b"HTTP/1.1 200 OK\r\n" + lines.encode()
                             + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def test_plain_http_fetch_never_answers_an_https_request(clean_upstreams, make_gateway):
    """D3: with plain HTTP allowed, a manifest fetched from ``http://ghcr.io`` (port 80, where
    anyone on the path can answer) is cached apart: an intercepted HTTPS client asking for the
    same tag gets what ghcr.io says over TLS, never the plain-HTTP copy."""
    from gateway.policy import Policy
    from gateway.settings import load_settings

    world = clean_upstreams
    evil = b'{"schemaVersion":2,"layers":[{"digest":"sha256:' + b"e" * 64 + b'","size":1}]}'
    server, port, seen = await _plain_origin(evil, {
        "Content-Type": "application/vnd.oci.image.manifest.v1+json",
        "Docker-Content-Digest": sha(evil)})
    try:
        gw = make_gateway(world, {"policy": {"allow_plain_http": True},
                                  "upstream": {"address_overrides": {"ghcr.io:80": f"127.0.0.1:{port}"}}})
        path = "/v2/aquasecurity/trivy-db/manifests/pX"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{GHCR}{path}", proxy=gw.proxy_url,
                             headers={"Accept": MANIFEST_ACCEPT}) as r:
                assert r.status == 200 and await r.read() == evil
            async with s.get(f"http://{GHCR}{path}", proxy=gw.proxy_url,
                             headers={"Accept": MANIFEST_ACCEPT}) as r:
                assert "hit" in r.headers["Cache-Status"]   # cached, on its own key
        assert len(seen) == 1
        world.clear_log()
        status, headers, body = await get(gw, f"https://{GHCR}{path}",
                                          headers={"Accept": MANIFEST_ACCEPT})
        assert body != evil and "hit" not in headers["Cache-Status"], (status, headers)
        assert len(world.requests(host=GHCR, path_contains="/manifests/pX")) == 1
    finally:
        server.close()
        await server.wait_closed()
    # and Trivy never uses plain HTTP: it is refused unless the operator allows it
    assert Policy(load_settings(env={})).decide(GHCR, 80, plain_http=True).action == "deny"


async def test_tag_query_is_part_of_the_key(clean_upstreams, make_gateway):
    """D10: ``/manifests/2?ns=evil`` is forwarded with its query, so it must not answer
    ``/manifests/2``."""
    world = clean_upstreams
    gw = make_gateway(world)
    other = b'{"schemaVersion":2,"layers":[]}'
    world.fail_status(MIRROR, 200, path="/manifests/2$", times=1, body=other,
                      headers={"Docker-Content-Digest": sha(other)},
                      content_type="application/vnd.oci.image.manifest.v1+json")
    url = f"https://{MIRROR}/v2/aquasec/trivy-db/manifests/2"
    status, _, body = await get(gw, url + "?ns=evil", headers={"Accept": MANIFEST_ACCEPT})
    assert status == 200 and body == other
    status, headers, body = await get(gw, url, headers={"Accept": MANIFEST_ACCEPT})
    assert status == 200 and sha(body) == world.digest("db") and "hit" not in headers["Cache-Status"]


async def test_rfc9111_isolation_for_generic_and_github_hosts(clean_upstreams, make_gateway):
    """D5: ``Vary: Cookie`` stored for alice is not served to a client without her cookie;
    ``no-store`` on one Cache-Control line is not overridden by ``max-age`` on another; GitHub
    hosts do not store ``private`` or ``Set-Cookie`` responses."""
    world = clean_upstreams
    gw = make_gateway(world, {"policy": {"rules": [
        {"host": CHECK, "action": "intercept"}, {"host": RAW_GITHUB, "action": "intercept"}]}})
    world.fail_status(CHECK, 200, path="^/vary$", times=None, body=b"alice's page",
                      headers=[("Cache-Control", "max-age=600"), ("Vary", "Accept"),
                               ("Vary", "Cookie")], content_type="text/plain")
    world.fail_status(CHECK, 200, path="^/nostore$", times=None, body=b"x",
                      headers=[("Cache-Control", "no-store"), ("Cache-Control", "max-age=600")],
                      content_type="text/plain")
    world.fail_status(RAW_GITHUB, 200, path="^/private$", times=None, body=b"mine",
                      headers=[("Cache-Control", "private, max-age=60")], content_type="text/plain")
    world.fail_status(RAW_GITHUB, 200, path="^/cookie$", times=None, body=b"mine",
                      headers=[("Set-Cookie", "session=abc")], content_type="text/plain")
    alice = {"Cookie": "session=alice"}
    assert (await get(gw, f"https://{CHECK}/vary", headers=alice))[0] == 200
    _, headers, _ = await get(gw, f"https://{CHECK}/vary", headers=alice)
    assert headers["Cache-Status"].startswith("trivy-gateway; hit")       # alice's variant
    _, headers, _ = await get(gw, f"https://{CHECK}/vary")
    assert "hit" not in headers["Cache-Status"]
    assert len(world.requests(host=CHECK, path_contains="/vary")) == 2
    sent = world.requests(host=CHECK, path_contains="/vary")[-1].request_headers
    assert "cookie" not in sent
    for host, path in ((CHECK, "/nostore"), (RAW_GITHUB, "/private"), (RAW_GITHUB, "/cookie")):
        for _ in range(2):
            status, headers, _ = await get(gw, f"https://{host}{path}")
            assert status == 200 and "hit" not in headers["Cache-Status"], (path, headers)
        assert len(world.requests(host=host, path_contains=path)) == 2, path


async def _chunked_origin(total: int, piece: bytes):
    """A plain-HTTP origin answering every GET with ``total`` bytes, chunked (no length),
    ``Cache-Control: max-age=600`` (``/huge``: 8 × ``total``, so a fetch the gateway stops early
    is told apart from one it finished even with megabytes in loopback socket buffers). Returns
    (server, port, state) where state counts the bytes each response got out and whether it was
    cut off."""
    state = {"sent": [], "cut": []}

    async def serve(reader, writer):
        sent = 0
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            size = total * 8 if b" /huge " in head.split(b"\r\n", 1)[0] else total
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Cache-Control: max-age=600\r\nTransfer-Encoding: chunked\r\n\r\n")
            while sent < size:
                n = min(len(piece), size - sent)
                writer.write(b"%x\r\n" % n + piece[:n] + b"\r\n")
                await writer.drain()
                sent += n
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            state["cut"].append(False)
        except (asyncio.IncompleteReadError, ConnectionError):
            state["cut"].append(True)
        finally:
            state["sent"].append(sent)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], state


async def test_chunked_body_larger_than_the_object_share_is_passed_through(clean_upstreams,
                                                                           make_gateway):
    """D6: a cacheable chunked response larger than cache.max_object_share × max_size is passed
    through whole and never stored, evicting nothing; once its client is gone the gateway stops
    fetching it (it neither writes the rest nor keeps reading the upstream)."""
    world = clean_upstreams
    mib = 1024 * 1024
    piece = bytes(range(256)) * 256                     # 64 KiB
    server, port, state = await _chunked_origin(12 * mib, piece)
    try:
        gw = make_gateway(world, {
            "cache": {"max_size": "4MiB", "max_object_share": 0.25},
            "policy": {"allow_plain_http": True, "rules": [
                {"host": CHECK, "action": "intercept"}, {"host": MAVEN, "action": "intercept"}]},
            "upstream": {"address_overrides": {f"{CHECK}:80": f"127.0.0.1:{port}"}}})
        pom = f"https://{MAVEN}/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom"
        assert (await get(gw, pom))[0] == 200
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{CHECK}/big", proxy=gw.proxy_url) as r:
                body = await r.read()
                assert r.status == 200
        assert body == piece * (12 * mib // len(piece))  # whole and intact
        assert state["cut"] == [False]
        _, headers, _ = await get(gw, pom)
        assert headers["Cache-Status"].startswith("trivy-gateway; hit")   # nothing evicted
        cache = gw.data_dir / "cache"
        assert list((cache / "tmp").iterdir()) == []
        stored = sum(p.stat().st_size for p in (cache / "blobs").rglob("*") if p.is_file())
        assert stored < mib
        # the client goes away early: the gateway stops fetching
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{CHECK}/huge", proxy=gw.proxy_url) as r:
                assert "hit" not in r.headers["Cache-Status"]
                await r.content.readexactly(2 * mib)
        for _ in range(200):                                # bounded wait for the origin to see it
            if len(state["sent"]) == 2:
                break
            await asyncio.sleep(0.05)
        assert state["cut"][-1] is True and state["sent"][-1] < 48 * mib
        assert list((cache / "tmp").iterdir()) == []
    finally:
        server.close()
        await server.wait_closed()
