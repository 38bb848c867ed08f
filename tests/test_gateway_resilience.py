"""Issue 4 through the whole gateway: client → proxy → pipeline/cache → upstream → emulated world.

Every test runs the real gateway subprocess (``make_gateway``) against the shared emulated world,
injects upstream faults with the world's knobs and proves the behaviour from both ends: what the
client (aiohttp through the gateway as proxy, or the real ``trivy`` binary) got, and what reached
the upstream (the world's own access log: attempts, Range headers, start/end times, headers).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import shutil
import time

import aiohttp
import pytest

from tests.emulated.world import (API_GITHUB, CDN, CODELOAD, GHCR, GITHUB, MAVEN, MIRROR, RAW_GITHUB,
                                  REPOSITORIES)

MANIFEST_ACCEPT = ("application/vnd.oci.image.manifest.v1+json,"
                   "application/vnd.docker.distribution.manifest.v2+json")
POM_DIR = "/maven2/org/example/resilience"


def blob_path(world, kind: str = "db", registry: str = MIRROR) -> str:
    mirror_repo, ghcr_repo, _ = REPOSITORIES[kind]
    return f"/v2/{mirror_repo if registry == MIRROR else ghcr_repo}/blobs/{world.digest(kind, 'layer')}"


async def get(gw, url, *, headers=None, session=None):
    """One request through the gateway as proxy; (status, headers, body). No redirects followed."""
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.get(url, proxy=gw.proxy_url, ssl=gw.client_ssl(), headers=headers or {},
                               allow_redirects=False, auto_decompress=False) as r:
            return r.status, r.headers, await r.read()
    finally:
        if own:
            await session.close()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pom_url(name: str, version: str = "1.0") -> str:
    return f"https://{MAVEN}{POM_DIR}/{name}/{version}/{name}-{version}.pom"


def max_overlap(entries) -> int:
    """Most requests the upstream was serving at the same moment (from t_start/t_end)."""
    events = []
    for e in entries:
        assert e.t_end is not None, e
        events.append((e.t_start, 1))
        events.append((e.t_end, -1))
    events.sort(key=lambda ev: (ev[0], ev[1]))  # an end before a start at the same instant
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def statuses(entries) -> list:
    return [e.status for e in entries]


def report(**figures) -> None:
    """Figures for the issue's closing note (visible with ``pytest -s`` / in -rA output)."""
    print("FIGURES " + " ".join(f"{k}={v}" for k, v in figures.items()))


# --------------------------------------------------------------------------------------------
# 429 bursts and Retry-After
# --------------------------------------------------------------------------------------------
async def test_429_burst_with_small_retry_after_absorbed_on_manifest_and_blob(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world, {"upstream": {"retry": {"attempts": 4}}})
    manifest_url = f"https://{MIRROR}/v2/aquasec/trivy-checks/manifests/2"
    blob_url = f"https://{MIRROR}{blob_path(world, 'javadb')}"
    world.too_many_requests(MIRROR, path="/manifests/", times=2, retry_after=1)
    world.too_many_requests(MIRROR, path="/blobs/", times=2, retry_after=1)
    t0 = time.monotonic()
    (ms, _, manifest), (bs, _, blob) = await asyncio.gather(
        get(gw, manifest_url, headers={"Accept": MANIFEST_ACCEPT}), get(gw, blob_url))
    elapsed = time.monotonic() - t0
    assert ms == 200 and sha(manifest) == world.digest("checks")
    assert bs == 200 and sha(blob) == world.digest("javadb", "layer")
    world.wait_idle(5)
    m = world.requests(host=MIRROR, path_contains="/manifests/")
    b = world.requests(host=MIRROR, path_contains="/blobs/")
    assert statuses(m) == [429, 429, 200], world.log_summary(m)
    assert statuses(b) == [429, 429, 200], world.log_summary(b)
    for entries in (m, b):  # Retry-After: 1 was honoured between attempts
        gaps = [later.t_start - earlier.t_start for earlier, later in zip(entries, entries[1:])]
        assert min(gaps) >= 0.95, gaps
    assert elapsed >= 2.0
    assert gw.metric("trivy_gateway_upstream_retries_total", host=MIRROR, reason="status_429") == 4
    assert gw.metric("trivy_gateway_upstream_retry_after_seconds_count", host=MIRROR) == 4
    assert gw.metric("trivy_gateway_upstream_retry_after_seconds_sum", host=MIRROR) == 4.0
    assert gw.metric("trivy_gateway_upstream_circuit_state", host=MIRROR) == 0
    report(test="429_burst", manifest_attempts=len(m), blob_attempts=len(b),
           elapsed=round(elapsed, 2))


async def test_ghcr_microsecond_retry_after_is_floored_no_hot_loop(clean_upstreams, make_gateway):
    world = clean_upstreams
    floor = 0.5
    gw = make_gateway(world, {"upstream": {"retry": {"attempts": 4, "retry_after_min": f"{floor}s"}}})
    url = f"https://{GHCR}/v2/aquasecurity/trivy-checks/manifests/2"
    world.too_many_requests(GHCR, path="/manifests/", times=3, style="ghcr")
    t0 = time.monotonic()
    status, _, manifest = await get(gw, url, headers={"Accept": MANIFEST_ACCEPT})
    elapsed = time.monotonic() - t0
    assert status == 200 and sha(manifest) == world.digest("checks")
    world.wait_idle(5)
    attempts = world.requests(host=GHCR, path_contains="/manifests/")
    assert statuses(attempts) == [429, 429, 429, 200], world.log_summary(attempts)
    assert all("35.852" not in (e.response_headers.get("retry-after") or "") for e in attempts)
    gaps = [b.t_start - a.t_start for a, b in zip(attempts, attempts[1:])]
    assert min(gaps) >= floor * 0.95, gaps  # 35.852µs was floored, never a hot loop
    assert elapsed >= floor * 3
    assert len(world.requests(host=MIRROR)) == 0  # absorbed on ghcr.io itself, no failover
    assert gw.metric("trivy_gateway_upstream_retries_total", host=GHCR, reason="status_429") == 3
    # the values seen are recorded as sent (µs), the wait is the floor
    assert gw.metric("trivy_gateway_upstream_retry_after_seconds_count", host=GHCR) == 3
    assert gw.metric("trivy_gateway_upstream_retry_after_seconds_sum", host=GHCR) < 0.001
    report(test="ghcr_us", attempts=len(attempts), elapsed=round(elapsed, 2),
           min_gap=round(min(gaps), 3), floor=floor)


# --------------------------------------------------------------------------------------------
# broken bodies and expired signatures
# --------------------------------------------------------------------------------------------
async def test_blob_cut_at_60_percent_resumed_with_range_then_cached(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world)
    layer = world.published["db"].layer  # the vulnerability DB, tens of MiB
    cut = int(layer.size * 0.6)
    world.cut_after(MIRROR, cut, path="/blobs/", times=1)
    url = f"https://{MIRROR}{blob_path(world, 'db')}"
    status, headers, body = await get(gw, url)
    assert status == 200 and len(body) == layer.size
    assert sha(body) == layer.digest
    world.wait_idle(5)
    reqs = world.requests(host=MIRROR, path_contains="/blobs/")
    assert [e.status for e in reqs] == [200, 206], world.log_summary(reqs)
    assert reqs[0].bytes_sent == cut and reqs[0].header("range") is None
    m = re.fullmatch(r"bytes=(\d+)-", reqs[1].header("range") or "")
    assert m and int(m.group(1)) == cut, reqs[1].request_headers
    assert reqs[1].bytes_sent == layer.size - cut
    assert gw.metric("trivy_gateway_upstream_resumed_downloads_total", host=MIRROR) == 1
    assert gw.metric("trivy_gateway_upstream_retries_total", host=MIRROR, reason="body") == 1
    # stored whole and verified: the next client is a hit, nothing reaches any upstream
    world.clear_log()
    status, headers, again = await get(gw, url)
    assert status == 200 and again == body and headers["Cache-Status"].startswith("trivy-gateway; hit")
    assert world.requests() == []
    report(test="resume", size=layer.size, cut_at=cut, range=reqs[1].header("range"))


async def test_ghcr_expired_signed_url_rerequested_from_registry(clean_upstreams, make_gateway):
    world = clean_upstreams
    # no failover partner: the blob must come from ghcr.io itself, via a fresh signed URL
    gw = make_gateway(world, {"upstream": {"failover_groups": []}})
    world.expire_signed_urls(1)
    url = f"https://{GHCR}{blob_path(world, 'checks', GHCR)}"
    status, _, body = await get(gw, url)
    assert status == 200, body[:300]
    assert sha(body) == world.digest("checks", "layer")
    world.wait_idle(5)
    cdn = world.requests(host=CDN)
    assert statuses(cdn) == [403, 200], world.log_summary(cdn)
    assert len(world.requests(host=GHCR, path_contains="/blobs/")) == 2
    assert world.requests(host=MIRROR) == []
    report(test="expired_sig", cdn=statuses(cdn))


# --------------------------------------------------------------------------------------------
# deadline
# --------------------------------------------------------------------------------------------
async def test_stalled_upstream_hits_deadline_client_gets_clear_504(clean_upstreams, make_gateway):
    world = clean_upstreams
    deadline = 2.0
    gw = make_gateway(world, {"upstream": {"read_timeout": "30s",
                                           "retry": {"deadline": f"{deadline}s"}}})
    world.hang(MAVEN, path="/stalled/", times=None, max_seconds=10)
    t0 = time.monotonic()
    status, headers, body = await asyncio.wait_for(get(gw, pom_url("stalled")), 15)
    elapsed = time.monotonic() - t0
    assert status == 504, body[:300]
    text = body.decode()
    assert MAVEN in text and "deadline" in text, text
    assert deadline <= elapsed < deadline + 2.5  # answered at the deadline, not a hang
    assert len(world.requests(host=MAVEN, path_contains="/stalled/")) == 1
    report(test="deadline", elapsed=round(elapsed, 2), body=text.strip()[:160])


async def test_stalled_registry_with_failover_partner_answers_within_deadline(clean_upstreams, make_gateway):
    """Both equivalent registries stall: the client is still answered once the deadline passed."""
    world = clean_upstreams
    deadline = 3.0
    gw = make_gateway(world, {"upstream": {"read_timeout": "30s",
                                           "retry": {"deadline": f"{deadline}s"}}})
    world.hang(MIRROR, path="/manifests/", times=None, max_seconds=10)
    world.hang(GHCR, path="/manifests/", times=None, max_seconds=10)
    t0 = time.monotonic()
    status, _, body = await asyncio.wait_for(
        get(gw, f"https://{MIRROR}/v2/aquasec/trivy-java-db/manifests/1",
            headers={"Accept": MANIFEST_ACCEPT}), 20)
    elapsed = time.monotonic() - t0
    assert status == 504, body[:300]
    report(test="deadline_failover", elapsed=round(elapsed, 2))
    # one deadline for the client's request, not one per failover member
    assert elapsed < deadline * 1.6, f"client answered after {elapsed:.1f}s, deadline {deadline}s"


# --------------------------------------------------------------------------------------------
# concurrency cap
# --------------------------------------------------------------------------------------------
async def test_100_concurrent_distinct_requests_never_exceed_4_at_upstream(clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world, {"upstream": {"limits": {MAVEN: {
        "rate": 1000, "burst": 1000, "max_concurrency": 4, "queue_size": 1000,
        "queue_timeout": "30s"}}}})
    n = 100
    for i in range(n // 2):  # half exist, half are 404 (negative entries)
        world.maven.put(f"org/example/resilience/conc{i}/1.0/conc{i}-1.0.pom",
                        f"<project><artifactId>conc{i}</artifactId></project>\n")
    world.delay(MAVEN, 0.05, path="/resilience/conc", times=None)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        t0 = time.monotonic()
        results = await asyncio.gather(*(get(gw, pom_url(f"conc{i}"), session=s) for i in range(n)))
        elapsed = time.monotonic() - t0
    assert [r[0] for r in results] == [200] * (n // 2) + [404] * (n // 2)
    assert world.wait_idle(5)
    reqs = world.requests(host=MAVEN, path_contains="/resilience/conc")
    assert len(reqs) == n and len({e.path for e in reqs}) == n
    peak = max_overlap(reqs)
    conns = len({e.conn_id for e in reqs})
    assert 2 <= peak <= 4, f"peak {peak}\n{world.log_summary(reqs)}"
    assert elapsed >= n * 0.05 / 4 * 0.9  # they really queued
    assert gw.metric("trivy_gateway_upstream_queue_wait_seconds_count", host=MAVEN) == n
    assert gw.metric("trivy_gateway_upstream_queue_wait_seconds_sum", host=MAVEN) > 1.0
    assert gw.metric("trivy_gateway_upstream_queue_depth", host=MAVEN) == 0
    assert gw.metric("trivy_gateway_upstream_active_requests", host=MAVEN) == 0
    report(test="cap4", requests=len(reqs), peak=peak, connections=conns,
           elapsed=round(elapsed, 2))


# --------------------------------------------------------------------------------------------
# circuit breaker
# --------------------------------------------------------------------------------------------
async def test_repeated_503_open_circuit_then_single_half_open_probe(clean_upstreams, make_gateway):
    world = clean_upstreams
    open_for = 4.0
    gw = make_gateway(world, {"upstream": {
        "retry": {"attempts": 2},
        "circuit": {"failure_threshold": 2, "open_for": f"{open_for}s"}}})
    world.service_unavailable(MAVEN, path="/resilience/", times=None)
    for name in ("down-a", "down-b"):
        status, _, _ = await get(gw, pom_url(name))
        assert status == 503
    assert len(world.requests(host=MAVEN)) == 4  # 2 requests × 2 attempts
    assert gw.metric("trivy_gateway_upstream_circuit_state", host=MAVEN) == 2  # open
    world.wait_idle(5)
    world.clear_log()
    # open: an immediate 503 with Retry-After for any uncached object on that host
    t0 = time.monotonic()
    answers = [await get(gw, pom_url(name)) for name in ("down-a", "down-c", "down-d")]
    fast = time.monotonic() - t0
    for status, headers, body in answers:
        assert status == 503 and 1 <= int(headers["Retry-After"]) <= open_for
        assert b"circuit for repo.maven.apache.org is open" in body, body
    assert fast < 1.0 * len(answers)
    assert world.requests(host=MAVEN) == []  # nothing reached the host while open
    # after the window: one probe; others arriving during it are held back
    await asyncio.sleep(int(answers[-1][1]["Retry-After"]) + 0.6)
    world.clear_faults(MAVEN)
    world.delay(MAVEN, 1.5, path="/resilience/probe", times=1)
    probe = asyncio.create_task(get(gw, pom_url("probe")))
    await asyncio.sleep(0.4)
    held = await asyncio.gather(*(get(gw, pom_url(f"held{i}")) for i in range(3)))
    assert [h[0] for h in held] == [503] * 3
    assert all("half-open" in h[2].decode() and h[1].get("Retry-After") for h in held)
    p_status, _, _ = await probe
    assert p_status == 404  # the probe got the host's real answer
    world.wait_idle(5)
    reached = world.requests(host=MAVEN)
    assert [e.path.rsplit("/", 1)[-1] for e in reached] == ["probe-1.0.pom"], world.log_summary(reached)
    assert gw.metric("trivy_gateway_upstream_circuit_state", host=MAVEN) == 0  # closed again
    status, _, _ = await get(gw, pom_url("after"))
    assert status == 404 and len(world.requests(host=MAVEN)) == 2
    report(test="circuit", open_answer_seconds=round(fast / len(answers), 3),
           half_open_requests_at_host=len(reached))


async def test_github_primary_rate_limit_serves_stale_and_stops_asking_until_reset(
        clean_upstreams, make_gateway):
    world = clean_upstreams
    gw = make_gateway(world, {"cache": {"github": {"ttl": "1s"}}})
    contents = f"https://{API_GITHUB}/repos/aquasecurity/vexhub/contents/"
    status, _, listing = await get(gw, contents)
    assert status == 200 and b"vex-repository.json" in listing
    world.wait_idle(5)
    world.github_rate_limit(0)           # from now on: 403 + X-RateLimit-Remaining: 0 + Reset
    world.clear_log()
    await asyncio.sleep(1.3)             # the cached listing's TTL is over
    answers = []
    for _ in range(6):
        answers.append(await get(gw, contents))
        await asyncio.sleep(0.1)
    for status, headers, body in answers:
        assert status == 200 and body == listing
        assert "stale" in headers.get("Cache-Status", ""), headers.get("Cache-Status")
    # an object the cache does not have: an immediate 429 with Retry-After until the reset
    status, headers, body = await get(gw, contents + "vex-repository.json")
    assert status == 429 and int(headers["Retry-After"]) > 60, (status, dict(headers), body)
    assert b"circuit for api.github.com is open" in body, body
    world.wait_idle(5)
    api = world.requests(host=API_GITHUB)
    assert statuses(api) == [403], world.log_summary(api)   # ONE request, then nothing
    assert gw.metric("trivy_gateway_upstream_circuit_state", host=API_GITHUB) == 2
    assert gw.metric("trivy_gateway_upstream_retry_after_seconds_count", host=API_GITHUB) == 1
    report(test="github_rate_limit", api_requests_while_limited=len(api),
           stale_answers=len(answers))


async def test_github_secondary_rate_limit_403_serves_stale(clean_upstreams, make_gateway):
    """A secondary limit (403 + Retry-After, budget left): a short one is retried by the
    gateway and the client never sees it; a long one serves the cached listing stale."""
    world = clean_upstreams
    gw = make_gateway(world, {"cache": {"github": {"ttl": "1s"}}})
    contents = f"https://{API_GITHUB}/repos/aquasecurity/vexhub/contents/"
    secondary = {"Retry-After": "1", "X-RateLimit-Remaining": "41"}
    body = '{"message": "You have exceeded a secondary rate limit."}'
    world.fail_status(API_GITHUB, 403, "/contents/", times=1, headers=secondary, body=body)
    status, headers, listing = await get(gw, contents)
    assert status == 200 and b"vex-repository.json" in listing     # waited out, retried
    world.wait_idle(5)
    assert statuses(world.requests(host=API_GITHUB)) == [403, 200]
    await asyncio.sleep(1.3)                     # the cached listing's TTL is over
    world.clear_log()
    world.fail_status(API_GITHUB, 403, "/contents/", times=None,
                      headers={**secondary, "Retry-After": "600"}, body=body)
    for _ in range(3):
        status, headers, again = await get(gw, contents)
        assert status == 200 and again == listing
        assert "stale" in headers.get("Cache-Status", ""), headers.get("Cache-Status")
    world.wait_idle(5)
    assert statuses(world.requests(host=API_GITHUB)) == [403]    # then the circuit is open
    world.clear_faults(API_GITHUB)


# --------------------------------------------------------------------------------------------
# credentials
# --------------------------------------------------------------------------------------------
async def test_credentials_injected_never_logged_never_forwarded_across_hosts(
        clean_upstreams, make_gateway, monkeypatch):
    world = clean_upstreams
    token = "ghp_resilienceTestToken0123456789abcdef"
    reg_secret = "registry-secret-5e5e5e5e"
    monkeypatch.setenv("GW_TEST_GITHUB_TOKEN", token)
    monkeypatch.setenv("GW_TEST_GHCR_PASSWORD", reg_secret)
    gw = make_gateway(world, {"upstream": {"credentials": [
        {"host": API_GITHUB, "type": "bearer", "secret_env": "GW_TEST_GITHUB_TOKEN"},
        {"host": GITHUB, "type": "bearer", "secret_env": "GW_TEST_GITHUB_TOKEN"},
        {"host": GHCR, "type": "basic", "username": "svc", "secret_env": "GW_TEST_GHCR_PASSWORD"},
    ]}})
    status, _, listing = await get(gw, f"https://{API_GITHUB}/repos/aquasecurity/vexhub/contents/")
    assert status == 200 and b"vex-repository.json" in listing
    status, _, _ = await get(gw, f"https://{RAW_GITHUB}/aquasecurity/vexhub/main/vex-repository.json")
    assert status == 200
    status, headers, _ = await get(gw, f"https://{GITHUB}/aquasecurity/vexhub/archive/refs/heads/main.tar.gz")
    assert status == 302 and CODELOAD in headers["Location"]
    status, _, archive = await get(gw, headers["Location"])
    assert status == 200 and archive
    # ghcr.io blob: token endpoint with the Basic credential, blob with the registry token,
    # then the gateway follows the 307 to the CDN itself
    status, _, blob = await get(gw, f"https://{GHCR}{blob_path(world, 'checks', GHCR)}")
    assert status == 200 and sha(blob) == world.digest("checks", "layer")
    world.wait_idle(5)
    api = world.requests(host=API_GITHUB)
    assert api and all(e.header("authorization") == f"Bearer {token}" for e in api)
    web = world.requests(host=GITHUB)
    assert web and all(e.header("authorization") == f"Bearer {token}" for e in web)
    for host in (CODELOAD, RAW_GITHUB, CDN, MIRROR):
        for e in world.requests(host=host):
            assert e.header("authorization") is None, (host, e.request_headers)
    ghcr = world.requests(host=GHCR)
    token_reqs = [e for e in ghcr if "/token" in e.path]
    assert token_reqs, world.log_summary(ghcr)
    basic = "Basic " + base64.b64encode(f"svc:{reg_secret}".encode()).decode()
    assert all(e.header("authorization") == basic for e in token_reqs)
    for e in ghcr:
        if "/token" not in e.path:  # the registry sees its own token, never the password
            assert reg_secret not in (e.header("authorization") or "")
            assert basic != e.header("authorization")
    # never in the gateway's log, metrics or status
    logged = gw.log_path.read_text(errors="replace")
    assert token not in logged and reg_secret not in logged
    assert base64.b64encode(f"svc:{reg_secret}".encode()).decode() not in logged
    assert token not in gw.metrics_text()
    status_json = str(gw.status())
    assert token not in status_json and reg_secret not in status_json
    report(test="credentials", api_requests=len(api), token_requests=len(token_reqs),
           codeload_auth=[e.header("authorization") for e in world.requests(host=CODELOAD)])


# --------------------------------------------------------------------------------------------
# the real Trivy binary through the gateway
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("trivy") is None, reason="trivy binary not installed")
async def test_trivy_db_download_survives_ghcr_429s_and_a_cut_blob(clean_upstreams, make_gateway, tmp_path):
    world = clean_upstreams
    gw = make_gateway(world, {"upstream": {"retry": {"attempts": 4, "retry_after_min": "0.3s"}}})
    layer = world.published["db"].layer
    world.too_many_requests(GHCR, path="/manifests/", times=3, style="ghcr")
    world.cut_after(CDN, int(layer.size * 0.6), path="/blobs/", times=1)
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TRIVY_") and "proxy" not in k.lower()
           and k not in ("GITHUB_TOKEN", "SSL_CERT_DIR")}
    env.update(HOME=str(home), TMPDIR=str(home / "tmp"), HTTPS_PROXY=gw.proxy_url,
               SSL_CERT_FILE=str(gw.ca_pem), TRIVY_NO_PROGRESS="true")
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "trivy", "image", "--download-db-only", "--db-repository", f"{GHCR}/aquasecurity/trivy-db:2",
        "--cache-dir", str(tmp_path / "cache"), "--timeout", "1m", env=env, cwd=str(home),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    elapsed = time.monotonic() - t0
    text = out.decode("utf-8", "replace")
    world.wait_idle(5)
    assert proc.returncode == 0, text + "\n" + world.log_summary() + "\n" + gw.log_tail()
    assert (tmp_path / "cache" / "db" / "trivy.db").exists()
    manifests = world.requests(host=GHCR, path_contains="/manifests/")
    assert statuses(manifests)[:4] == [429, 429, 429, 200], world.log_summary(manifests)
    cdn = world.requests(host=CDN)
    assert statuses(cdn) == [200, 206], world.log_summary(cdn)
    assert cdn[1].header("range") == f"bytes={int(layer.size * 0.6)}-"
    assert world.requests(host=MIRROR) == []
    assert gw.metric("trivy_gateway_upstream_resumed_downloads_total", host=CDN) == 1
    report(test="trivy", elapsed=round(elapsed, 2), manifest_attempts=len(manifests),
           cdn=statuses(cdn), db_mib=round(layer.size / 2**20, 1))
