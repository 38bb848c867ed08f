"""Proves the emulated upstream world (tests/emulated) is faithful.

Two kinds of tests:

* ``e2e``: the real Trivy 0.76 binary runs every flow against the world
  through a plain CONNECT tunnel proxy (HTTPS_PROXY + SSL_CERT_FILE).
* direct: an aiohttp client exercises the fault knobs and protocol details.

The world (and its ~60 MiB DB, size via $TRIVY_EMU_DB_MIB) is built once per
module.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tests.emulated import CUSTOM_CHECK_ID, WorldThread, write_config_project, write_maven_project
from tests.emulated.artifacts import (
    JAVADB_SCHEMA_VERSION,
    PADDING_MEMBER,
    check_bbolt,
    empty_bbolt,
)
from tests.emulated.client import world_session
from tests.emulated.services import vex_repository_manifest

TRIVY = shutil.which("trivy")
needs_trivy = pytest.mark.skipif(TRIVY is None, reason="trivy binary not installed")
UA = "trivy/0.76.0"
MIRROR, GHCR, CDN = "mirror.gcr.io", "ghcr.io", "pkg-containers.githubusercontent.com"
API, RAW, GH, CODELOAD = "api.github.com", "raw.githubusercontent.com", "github.com", "codeload.github.com"
MAVEN, CHECK = "repo.maven.apache.org", "check.trivy.dev"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    wt = WorldThread(tmp_path_factory.mktemp("world"))
    wt.start()
    try:
        yield wt
    finally:
        wt.stop()


@pytest.fixture(scope="module")
def proxy(world):
    return world.tunnel_proxy()


@pytest.fixture(autouse=True)
def _reset_world(request):
    if "world" not in request.fixturenames:
        yield
        return
    w = request.getfixturevalue("world")
    w.clear_faults()
    w.clear_log()
    published = dict(w.published)
    yield
    w.clear_faults()
    for kind, art in published.items():
        if w.published.get(kind) is not art:
            w.publish(kind, art)
    w.github.set_manifest(vex_repository_manifest())


class Trivy:
    """Runs the real trivy with HOME/TMPDIR/cache in a tmp dir, via the proxy."""

    def __init__(self, world, proxy, base: Path) -> None:
        self.world, self.proxy, self.base = world, proxy, base
        self.home = base / "home"
        self.cache = base / "cache"
        (self.home / "tmp").mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        drop = {"GITHUB_TOKEN", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy",
                "SSL_CERT_DIR"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIVY_") and k not in drop}
        env.update(
            HOME=str(self.home),
            TMPDIR=str(self.home / "tmp"),
            HTTPS_PROXY=self.proxy.url,
            NO_PROXY="127.0.0.1,localhost",
            SSL_CERT_FILE=str(self.world.ca_pem),
        )
        return env

    def popen(self, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([TRIVY, *args], env=self.env(), cwd=str(self.home),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def run(self, *args: str, cache: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        full = [*args, "--cache-dir", str(cache or self.cache)]
        p = self.popen(*full)
        try:
            out, err = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
        return subprocess.CompletedProcess([TRIVY, *full], p.returncode, out, err)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                try:
                    p.communicate(timeout=10)
                except Exception:
                    pass


@pytest.fixture
def trivy(world, proxy, tmp_path):
    t = Trivy(world, proxy, tmp_path)
    try:
        yield t
    finally:
        t.close()


def _diag(world, res: subprocess.CompletedProcess | None = None) -> str:
    s = "access log:\n" + world.log_summary()
    if res is not None:
        s += f"\nexit={res.returncode}\nstderr:\n{res.stderr[-4000:]}"
    return s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ====================================================== artifacts (no network)
def test_bbolt_file_layout():
    data = empty_bbolt()
    meta = check_bbolt(data)
    assert len(data) == 4 * 4096
    assert meta[0]["root"] == 3 and meta[0]["freelist"] == 2 and meta[0]["hwm"] == 4
    assert (meta[0]["txid"], meta[1]["txid"]) == (0, 1)


def test_artifact_contents(world):
    db = world.published["db"]
    with tarfile.open(fileobj=io.BytesIO(db.layer.read()), mode="r:gz") as tar:
        names = tar.getnames()
        assert names[:2] == ["trivy.db", "metadata.json"] and PADDING_MEMBER in names
        check_bbolt(tar.extractfile("trivy.db").read())
        meta = json.loads(tar.extractfile("metadata.json").read())
    assert meta["Version"] == 2 and meta["NextUpdate"] > meta["UpdatedAt"]
    assert json.loads(db.manifest)["layers"][0]["annotations"]["org.opencontainers.image.title"] == "db.tar.gz"
    # identical digests on both registries
    assert world.mirror.tag_digest("aquasec/trivy-db", "2") == world.ghcr.tag_digest("aquasecurity/trivy-db", "2")

    jdb = world.published["javadb"]
    with tarfile.open(fileobj=io.BytesIO(jdb.layer.read()), mode="r:gz") as tar:
        assert json.loads(tar.extractfile("metadata.json").read())["Version"] == JAVADB_SCHEMA_VERSION
        dbfile = world.workdir / "check-java.db"
        dbfile.write_bytes(tar.extractfile("trivy-java.db").read())
    con = sqlite3.connect(dbfile)
    try:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        assert tables == {"artifacts", "indices"}
    finally:
        con.close()

    checks = world.published["checks"]
    man = json.loads(checks.manifest)
    assert man["annotations"]["org.opencontainers.image.version"].split(".")[0] == "2"
    with tarfile.open(fileobj=io.BytesIO(checks.layer.read()), mode="r:gz") as tar:
        rego = [n for n in tar.getnames() if n.endswith(".rego")]
        assert rego and CUSTOM_CHECK_ID in tar.extractfile(rego[0]).read().decode()


# ============================================================ real Trivy (e2e)
def _oci_flow(world, host: str, repo: str, tag: str) -> list:
    entries = world.requests(host=host)
    paths = [e.path for e in entries]
    assert paths[0] == "/v2/" and entries[0].status == 401, _diag(world)
    assert any(e.status == 200 and "token" in e.path for e in entries), _diag(world)
    man = [e for e in entries if e.path == f"/v2/{repo}/manifests/{tag}"]
    assert man and man[-1].status == 200 and man[-1].method == "GET"
    assert "application/vnd.oci.image.manifest.v1+json" in man[-1].header("accept")
    assert man[-1].header("authorization", "").startswith("Bearer ")
    for e in entries:
        assert e.header("user-agent") == UA, e
    return entries


@pytest.mark.e2e
@needs_trivy
def test_trivy_db_download_default(world, trivy):
    res = trivy.run("image", "--download-db-only", "--timeout", "2m")
    assert res.returncode == 0, _diag(world, res)
    entries = _oci_flow(world, MIRROR, "aquasec/trivy-db", "2")
    blob = [e for e in entries if "/blobs/" in e.path]
    layer = world.published["db"].layer
    assert len(blob) == 1 and blob[0].status == 200 and blob[0].bytes_sent == layer.size
    assert blob[0].path.endswith(layer.digest) and blob[0].header("range") is None
    assert not world.requests(host=GHCR)
    assert len({e.conn_id for e in entries}) == 1  # one keep-alive connection
    dbdir = trivy.cache / "db"
    check_bbolt((dbdir / "trivy.db").read_bytes())
    meta = json.loads((dbdir / "metadata.json").read_text())
    assert meta["Version"] == 2 and not meta["DownloadedAt"].startswith("0001")
    # the padding member is extracted next to the DB and otherwise left alone
    assert (dbdir / PADDING_MEMBER).exists()
    # the DB opens: a vuln scan with --skip-db-update works on it
    proj = trivy.base / "proj"
    proj.mkdir()
    (proj / "requirements.txt").write_text("flask==0.5\n")
    res2 = trivy.run("fs", "--scanners", "vuln", "--skip-db-update", "--format", "json", "--timeout", "1m", str(proj))
    assert res2.returncode == 0, _diag(world, res2)
    assert json.loads(res2.stdout)["ArtifactName"]
    # fresh cache: a second download-db-only sends nothing to the registries
    world.clear_log()
    res3 = trivy.run("image", "--download-db-only", "--timeout", "1m")
    assert res3.returncode == 0 and not world.requests(host=MIRROR), _diag(world, res3)


@pytest.mark.e2e
@needs_trivy
def test_trivy_db_download_ghcr_redirect(world, trivy):
    res = trivy.run("image", "--download-db-only", "--db-repository", "ghcr.io/aquasecurity/trivy-db:2",
                    "--timeout", "2m")
    assert res.returncode == 0, _diag(world, res)
    entries = _oci_flow(world, GHCR, "aquasecurity/trivy-db", "2")
    blob = [e for e in entries if "/blobs/" in e.path]
    assert len(blob) == 1 and blob[0].status == 307, _diag(world)
    loc = blob[0].response_headers["location"]
    assert loc.startswith(f"https://{CDN}/ghcr1/blobs/sha256:") and "se=" in loc and "sig=" in loc
    cdn = world.requests(host=CDN)
    assert len(cdn) == 1 and cdn[0].status == 200, _diag(world)
    assert cdn[0].bytes_sent == world.published["db"].layer.size
    assert cdn[0].header("authorization") is None and cdn[0].header("user-agent") == UA
    assert cdn[0].conn_id != blob[0].conn_id
    assert not world.requests(host=MIRROR)


@pytest.mark.e2e
@needs_trivy
def test_trivy_java_db_download(world, trivy):
    res = trivy.run("image", "--download-java-db-only", "--timeout", "2m")
    assert res.returncode == 0, _diag(world, res)
    entries = _oci_flow(world, MIRROR, "aquasec/trivy-java-db", "1")
    assert [e.status for e in entries if "/blobs/" in e.path] == [200]
    jdir = trivy.cache / "java-db"
    assert (jdir / "trivy-java.db").exists()
    assert json.loads((jdir / "metadata.json").read_text())["Version"] == JAVADB_SCHEMA_VERSION


@pytest.mark.e2e
@needs_trivy
def test_trivy_config_uses_downloaded_bundle(world, trivy):
    proj = trivy.base / "cfg"
    write_config_project(proj)
    res = trivy.run("config", "--format", "json", "--timeout", "2m", str(proj))
    assert res.returncode == 0, _diag(world, res)
    assert "Falling back to embedded checks" not in res.stderr, res.stderr
    report = json.loads(res.stdout)
    ids = {m.get("ID") for r in report.get("Results", []) for m in r.get("Misconfigurations") or []}
    assert CUSTOM_CHECK_ID in ids, (ids, res.stderr[-3000:])
    _oci_flow(world, MIRROR, "aquasec/trivy-checks", "2")
    blob = world.requests(host=MIRROR, path_contains="/blobs/")
    assert [b.status for b in blob] == [200]
    assert blob[0].path.endswith(world.published["checks"].layer.digest)
    upd = world.requests(host=CHECK)
    assert upd and upd[0].path == "/updates" and upd[0].header("trivy-command") is not None  # Trivy 0.76 sends "fs" here


@pytest.mark.e2e
@needs_trivy
def test_trivy_config_falls_back_when_checks_unavailable(world, trivy):
    world.service_unavailable(MIRROR, r"/trivy-checks/manifests/", times=None)
    proj = trivy.base / "cfg"
    write_config_project(proj)
    res = trivy.run("config", "--format", "json", "--timeout", "2m", str(proj))
    assert res.returncode == 0, _diag(world, res)
    assert "Falling back to embedded checks" in res.stderr
    ids = {m.get("ID") for r in json.loads(res.stdout).get("Results", []) for m in r.get("Misconfigurations") or []}
    assert CUSTOM_CHECK_ID not in ids
    assert len(world.requests(host=MIRROR, path_contains="/manifests/", status=503)) == 3


@pytest.mark.e2e
@needs_trivy
def test_trivy_vex_repo_download_and_304(world, trivy):
    world.github.set_manifest(vex_repository_manifest("1s"))
    res = trivy.run("vex", "repo", "init", "--timeout", "1m")
    assert res.returncode == 0, _diag(world, res)
    assert (trivy.home / ".trivy" / "vex" / "repository.yaml").exists()
    assert not world.requests(), "vex repo init must not send anything"
    res = trivy.run("vex", "repo", "download", "--timeout", "1m")
    assert res.returncode == 0, _diag(world, res)
    api = world.requests(host=API)
    assert [e.path for e in api] == ["/repos/aquasecurity/vexhub/contents/"] * 2, _diag(world)
    assert all(e.header("accept") == "application/vnd.github.v3+json" for e in api)
    assert all(e.header("x-github-api-version") == "2022-11-28" for e in api)
    raw = world.requests(host=RAW)
    assert [(e.method, e.path, e.status) for e in raw] == [
        ("GET", "/aquasecurity/vexhub/main/vex-repository.json", 200)] * 2
    gh = world.requests(host=GH)
    assert [(e.method, e.status) for e in gh] == [("HEAD", 302), ("GET", 302)]
    cl = world.requests(host=CODELOAD)
    assert [(e.method, e.status) for e in cl] == [("HEAD", 200), ("GET", 200)]
    etag = world.github.archive_etag
    vdir = trivy.cache / "vex" / "repositories" / "default"
    assert (vdir / "0.1" / "index.json").exists()
    assert json.loads((vdir / "cache.json").read_text())["ETags"]
    assert etag in json.loads((vdir / "cache.json").read_text())["ETags"].values()

    time.sleep(1.2)  # update_interval of the emulated manifest is 1s
    world.clear_log()
    res = trivy.run("vex", "repo", "download", "--timeout", "1m")
    assert res.returncode == 0, _diag(world, res)
    cl = world.requests(host=CODELOAD)
    assert [(e.method, e.status) for e in cl] == [("HEAD", 304), ("GET", 304)], _diag(world)
    assert all(e.header("if-none-match") == etag for e in cl + world.requests(host=GH))
    assert not world.requests(host=RAW), "manifest is cached forever"
    assert (vdir / "0.1" / "index.json").exists()


@pytest.mark.e2e
@needs_trivy
def test_trivy_vex_download_github_rate_limited(world, trivy):
    world.github_rate_limit(after=1)
    assert trivy.run("vex", "repo", "init", "--timeout", "1m").returncode == 0
    res = trivy.run("vex", "repo", "download", "--timeout", "1m")
    assert res.returncode != 0, _diag(world, res)
    api = world.requests(host=API)
    assert [e.status for e in api] == [200, 403], _diag(world)
    assert api[1].response_headers["x-ratelimit-remaining"] == "0"


@pytest.mark.e2e
@needs_trivy
def test_trivy_fs_pom_fetches_from_maven_central(world, trivy):
    proj = trivy.base / "mvn"
    write_maven_project(proj)
    res = trivy.run("fs", "--format", "cyclonedx", "--timeout", "2m", str(proj))
    assert res.returncode == 0, _diag(world, res)
    bom = json.loads(res.stdout)
    names = {c["name"] for c in bom.get("components", [])}
    assert {"demo-lib", "demo-transitive"} <= names, names
    got = [(e.path, e.status) for e in world.requests(host=MAVEN)]
    want = [
        "/maven2/org/example/demo/demo-parent/1.0.0/demo-parent-1.0.0.pom",
        "/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom",
        "/maven2/org/example/demo/demo-transitive/0.9.0/demo-transitive-0.9.0.pom",
    ]
    assert sorted(p for p, s in got if s == 200) == sorted(want), _diag(world)
    assert all(e.header("authorization") is None for e in world.requests(host=MAVEN))
    assert not world.requests(host=MIRROR, path_contains="/blobs/"), "cyclonedx alone must not fetch the DB"


@pytest.mark.e2e
@needs_trivy
def test_trivy_fs_maven_429_is_fatal(world, trivy):
    proj = trivy.base / "mvn"
    write_maven_project(proj)
    world.too_many_requests(MAVEN, times=None, retry_after=60, style="plain")
    res = trivy.run("fs", "--format", "cyclonedx", "--timeout", "1m", str(proj))
    assert res.returncode != 0, _diag(world, res)
    assert len(world.requests(host=MAVEN)) == 1, _diag(world)


@pytest.mark.e2e
@needs_trivy
def test_trivy_server_and_client(world, trivy):
    port = _free_port()
    srv_cache = trivy.base / "srv-cache"
    srv = trivy.popen("server", "--listen", f"127.0.0.1:{port}", "--token", "T0ken", "--cache-dir", str(srv_cache),
                      "--timeout", "2m")
    deadline = time.monotonic() + 90
    ready = False
    while time.monotonic() < deadline and srv.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                ready = r.status == 200
        except OSError:
            pass
        if ready:
            break
        time.sleep(0.3)
    assert ready, _diag(world) + f"\nserver exit={srv.poll()}"
    assert len(world.requests(host=MIRROR, path_contains="/trivy-db/blobs/", status=200)) == 1
    proj = trivy.base / "proj"
    proj.mkdir()
    (proj / "requirements.txt").write_text("flask==0.5\n")
    res = trivy.run("fs", "--server", f"http://127.0.0.1:{port}", "--token", "T0ken", "--scanners", "vuln",
                    "--format", "json", "--timeout", "1m", str(proj), cache=trivy.base / "client-cache")
    assert res.returncode == 0, _diag(world, res)
    report = json.loads(res.stdout)
    assert any(r.get("Target") == "requirements.txt" for r in report.get("Results", [])), report
    # the client never downloads the DB itself
    assert len(world.requests(host=MIRROR, path_contains="/trivy-db/blobs/")) == 1
    bad = trivy.run("fs", "--server", f"http://127.0.0.1:{port}", "--token", "wrong", "--scanners", "vuln",
                    "--timeout", "30s", str(proj), cache=trivy.base / "client-cache2")
    assert bad.returncode != 0
    srv.terminate()
    try:
        srv.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        srv.kill()


@pytest.mark.e2e
@needs_trivy
def test_trivy_falls_back_to_ghcr_on_blob_unknown(world, trivy):
    world.blob_unknown(MIRROR, r"/trivy-db/blobs/")
    res = trivy.run("image", "--download-db-only", "--timeout", "2m")
    assert res.returncode == 0, _diag(world, res)
    assert [e.status for e in world.requests(host=MIRROR, path_contains="/blobs/")] == [404]
    assert [e.status for e in world.requests(host=GHCR, path_contains="/blobs/")] == [307]
    assert [e.status for e in world.requests(host=CDN)] == [200]


@pytest.mark.e2e
@needs_trivy
def test_trivy_expired_signed_url_fails(world, trivy):
    world.expire_signed_urls(1)
    res = trivy.run("image", "--download-db-only", "--db-repository", "ghcr.io/aquasecurity/trivy-db:2",
                    "--timeout", "1m")
    assert res.returncode != 0, _diag(world, res)
    cdn = world.requests(host=CDN)
    assert [e.status for e in cdn] == [403] and "expiry" in cdn[0].note, _diag(world)


@pytest.mark.e2e
@needs_trivy
def test_trivy_detects_corrupt_and_cut_layers(world, trivy):
    size = world.published["db"].layer.size
    world.corrupt_byte(MIRROR, size // 2, r"/blobs/")
    res = trivy.run("image", "--download-db-only", "--timeout", "1m")
    assert res.returncode != 0 and "sha256" in res.stderr, _diag(world, res)
    assert not world.requests(host=GHCR), "no fallback on a digest mismatch"
    world.clear_log()
    world.cut_after(MIRROR, 1 << 20, r"/blobs/")
    res = trivy.run("image", "--download-db-only", "--timeout", "1m", cache=trivy.base / "cache2")
    assert res.returncode != 0, _diag(world, res)
    blob = world.requests(host=MIRROR, path_contains="/blobs/")
    assert len(blob) == 1 and blob[0].note.startswith("cut@") and blob[0].bytes_sent == 1 << 20
    assert blob[0].content_length == size


@pytest.mark.e2e
@needs_trivy
def test_trivy_refused_connection_no_fallback(world, trivy):
    world.refuse(MIRROR)
    try:
        res = trivy.run("image", "--download-db-only", "--timeout", "30s")
    finally:
        world.accept(MIRROR)
    assert res.returncode != 0, _diag(world, res)
    assert not world.requests(host=GHCR)
    assert any(r.status == 502 for r in trivy.proxy.connects() if r.target.startswith(MIRROR))


# ===================================================== direct (aiohttp) tests
async def _token(s: aiohttp.ClientSession, host: str, repo: str) -> str:
    realm = {MIRROR: f"https://{MIRROR}/v2/token", GHCR: f"https://{GHCR}/token"}[host]
    async with s.get(realm, params={"scope": f"repository:{repo}:pull", "service": host}) as r:
        assert r.status == 200
        body = await r.json()
        assert body["expires_in"] == 300 and body["token"] == body["access_token"]
        return body["token"]


async def test_registry_auth_and_manifests(world):
    async with world_session(world) as s:
        async with s.get(f"https://{MIRROR}/v2/") as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == \
                f'Bearer realm="https://{MIRROR}/v2/token",service="{MIRROR}"'
        async with s.get(f"https://{GHCR}/v2/") as r:
            assert r.status == 401
            assert 'realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull"' in \
                r.headers["WWW-Authenticate"]
        murl = f"https://{MIRROR}/v2/aquasec/trivy-db/manifests/2"
        async with s.get(murl) as r:
            assert r.status == 401 and "scope=\"repository:aquasec/trivy-db:pull\"" in r.headers["WWW-Authenticate"]
        wrong = await _token(s, MIRROR, "aquasec/trivy-checks")
        async with s.get(murl, headers={"Authorization": f"Bearer {wrong}"}) as r:
            assert r.status == 401
        tok = await _token(s, MIRROR, "aquasec/trivy-db")
        auth = {"Authorization": f"Bearer {tok}"}
        async with s.get(murl, headers=auth) as r:
            assert r.status == 200
            body = await r.read()
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            assert r.headers["Docker-Content-Digest"] == digest
            assert r.headers["ETag"] == f'"{digest}"'
            assert r.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
            assert int(r.headers["Content-Length"]) == len(body)
        man = json.loads(body)
        assert man["config"]["mediaType"] == "application/vnd.aquasec.trivy.config.v1+json"
        assert man["layers"][0]["mediaType"] == "application/vnd.aquasec.trivy.db.layer.v1.tar+gzip"
        async with s.head(f"https://{MIRROR}/v2/aquasec/trivy-db/manifests/{digest}", headers=auth) as r:
            assert r.status == 200 and r.headers["Docker-Content-Digest"] == digest
            assert int(r.headers["Content-Length"]) == len(body) and await r.read() == b""
        async with s.get(f"https://{MIRROR}/v2/aquasec/trivy-db/manifests/nope", headers=auth) as r:
            assert r.status == 404 and (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        # ghcr serves identical manifest bytes
        gtok = await _token(s, GHCR, "aquasecurity/trivy-db")
        async with s.get(f"https://{GHCR}/v2/aquasecurity/trivy-db/manifests/2",
                         headers={"Authorization": f"Bearer {gtok}"}) as r:
            assert r.status == 200 and await r.read() == body


async def test_blob_range_and_cdn_signature(world):
    layer = world.published["db"].layer
    data = layer.view()
    async with world_session(world) as s:
        tok = await _token(s, MIRROR, "aquasec/trivy-db")
        url = f"https://{MIRROR}/v2/aquasec/trivy-db/blobs/{layer.digest}"
        async with s.get(url, headers={"Authorization": f"Bearer {tok}", "Range": "bytes=100-199"}) as r:
            assert r.status == 206 and await r.read() == bytes(data[100:200])
            assert r.headers["Content-Range"] == f"bytes 100-199/{layer.size}"
        async with s.head(url, headers={"Authorization": f"Bearer {tok}"}) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == layer.size
        gtok = await _token(s, GHCR, "aquasecurity/trivy-db")
        gurl = f"https://{GHCR}/v2/aquasecurity/trivy-db/blobs/{layer.digest}"
        locs = []
        for _ in range(2):
            async with s.get(gurl, headers={"Authorization": f"Bearer {gtok}"}, allow_redirects=False) as r:
                assert r.status == 307
                locs.append(r.headers["Location"])
        assert locs[0] != locs[1], "signature must differ per request"
        assert "sp=r&spr=https&sr=b&sv=2019-12-12" in locs[0]
        async with s.get(locs[0], headers={"Range": "bytes=-10"}) as r:
            assert r.status == 206 and await r.read() == bytes(data[-10:])
        tampered = locs[0].replace("sig=", "sig=AAAA")
        async with s.get(tampered) as r:
            assert r.status == 403
        world.expire_signed_urls(1)
        async with s.get(gurl, headers={"Authorization": f"Bearer {gtok}"}, allow_redirects=False) as r:
            expired = r.headers["Location"]
        async with s.get(expired) as r:
            assert r.status == 403 and "Signed expiry time has passed" in await r.text()


async def test_status_faults_are_bounded(world):
    async with world_session(world) as s:
        world.too_many_requests(GHCR, r"^/v2/$", times=2, style="ghcr")
        world.too_many_requests(MIRROR, r"^/v2/$", times=1, retry_after=30)
        async with s.get(f"https://{MIRROR}/v2/") as r:
            assert r.status == 429 and r.headers["Retry-After"] == "30"
        async with s.get(f"https://{MIRROR}/v2/") as r:
            assert r.status == 401
        for _ in range(2):
            async with s.get(f"https://{GHCR}/v2/") as r:
                assert r.status == 429
                err = (await r.json())["errors"][0]
                assert f"{err['code']}: {err['message']}" == \
                    "TOOMANYREQUESTS: retry-after: 35.852µs, allowed: 44000/minute"
        async with s.get(f"https://{GHCR}/v2/") as r:
            assert r.status == 401
        f = world.service_unavailable(CHECK, "/updates", times=None)
        for _ in range(3):
            async with s.get(f"https://{CHECK}/updates") as r:
                assert r.status == 503
        world.faults.remove(f)
        async with s.get(f"https://{CHECK}/updates") as r:
            assert r.status == 200 and (await r.json())["trivy"]["latest_version"]
        world.blob_unknown(MIRROR)
        tok = await _token(s, MIRROR, "aquasec/trivy-checks")
        digest = world.published["checks"].layer.digest
        async with s.get(f"https://{MIRROR}/v2/aquasec/trivy-checks/blobs/{digest}",
                         headers={"Authorization": f"Bearer {tok}"}) as r:
            assert r.status == 404 and (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert [e.status for e in world.requests(host=CHECK)] == [503, 503, 503, 200]


async def test_body_faults_cut_corrupt_throttle(world):
    body_len = len(world.maven.files["org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom"])
    url = f"https://{MAVEN}/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom"
    async with world_session(world) as s:
        async with s.get(url) as r:
            good = await r.read()
        world.cut_after(MAVEN, 100, r"demo-lib")
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(url) as r:
                assert int(r.headers["Content-Length"]) == body_len
                await r.read()
        world.corrupt_byte(MAVEN, 10, r"demo-lib")
        async with s.get(url) as r:
            bad = await r.read()
        assert len(bad) == len(good) and bad != good and bad[10] == good[10] ^ 0xFF
        world.throttle(MAVEN, 1000, r"demo-lib", times=1)
        t0 = time.monotonic()
        async with s.get(url) as r:
            assert await r.read() == good
        assert time.monotonic() - t0 >= body_len / 1000 * 0.8
    notes = [e.note for e in world.requests(host=MAVEN)]
    assert notes[1] == "cut@100" and notes[2] == "corrupt@10" and notes[3].startswith("throttle")
    assert world.requests(host=MAVEN)[1].bytes_sent == 100


async def test_hang_drop_and_refuse(world):
    async with world_session(world, timeout=aiohttp.ClientTimeout(total=1.5)) as s:
        world.hang(CHECK, "/updates", max_seconds=3)
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            async with s.get(f"https://{CHECK}/updates") as r:
                await r.read()
        assert time.monotonic() - t0 < 3
        f = world.drop(CHECK, "/updates", times=None)  # aiohttp retries a dropped GET once
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"https://{CHECK}/updates") as r:
                await r.read()
        world.faults.remove(f)
    await asyncio.to_thread(world.refuse, CHECK)
    try:
        assert not world.is_listening(CHECK)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", world.port(CHECK)), timeout=2).close()
    finally:
        await asyncio.to_thread(world.accept, CHECK)
    async with world_session(world) as s:
        async with s.get(f"https://{CHECK}/updates") as r:
            assert r.status == 200
    await asyncio.to_thread(world.stall, CHECK, 5)
    try:
        assert not world.is_listening(CHECK)
        async with world_session(world, timeout=aiohttp.ClientTimeout(total=1)) as s:
            with pytest.raises(asyncio.TimeoutError):  # TCP accepted, TLS never answered
                async with s.get(f"https://{CHECK}/updates") as r:
                    pass
    finally:
        await asyncio.to_thread(world.accept, CHECK)
    async with world_session(world) as s:
        async with s.get(f"https://{CHECK}/updates") as r:
            assert r.status == 200
    # the hang ended (bounded) and was logged
    assert await asyncio.to_thread(world.wait_idle, 5)
    notes = [e.note for e in world.requests(host=CHECK)]
    assert "hang" in notes[0] and "dropped" in notes[1]


async def test_github_vex_endpoints(world):
    async with world_session(world) as s:
        async with s.get(f"https://{API}/repos/aquasecurity/vexhub/contents/") as r:
            listing = await r.json()
        entry = next(e for e in listing if e["name"] == "vex-repository.json")
        assert entry["download_url"] == f"https://{RAW}/aquasecurity/vexhub/main/vex-repository.json"
        async with s.get(entry["download_url"]) as r:
            manifest = await r.json(content_type=None)
        url = manifest["versions"][0]["locations"][0]["url"]
        assert url == "https://github.com/aquasecurity/vexhub/archive/refs/heads/main.tar.gz//vexhub-main"
        async with s.head(url.split("//vexhub-main")[0], allow_redirects=False) as r:
            assert r.status == 302
            loc = r.headers["Location"]
        assert loc == f"https://{CODELOAD}/aquasecurity/vexhub/tar.gz/refs/heads/main"
        async with s.get(loc) as r:
            etag = r.headers["ETag"]
            data = await r.read()
        assert etag.startswith('"') and not etag.startswith('W/')
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            idx = json.loads(tar.extractfile("vexhub-main/index.json").read())
            loc0 = idx["packages"][0]["location"]
            doc = json.loads(tar.extractfile(f"vexhub-main/{loc0}").read())
        assert doc["statements"][0]["status"] == "not_affected"
        for m in (s.get, s.head):
            async with m(loc, headers={"If-None-Match": etag}) as r:
                assert r.status == 304
        new_etag = world.publish_vex(2)
        try:
            assert new_etag != etag
            async with s.get(loc, headers={"If-None-Match": etag}) as r:
                assert r.status == 200 and r.headers["ETag"] == new_etag
        finally:
            world.publish_vex(1)
        world.github_rate_limit(after=2)
        statuses = []
        for _ in range(3):
            async with s.get(f"https://{API}/repos/aquasecurity/vexhub/contents/") as r:
                statuses.append((r.status, r.headers["X-RateLimit-Remaining"]))
                if r.status == 403:
                    assert "API rate limit exceeded" in (await r.json())["message"]
        assert statuses == [(200, "1"), (200, "0"), (403, "0")]


async def test_maven_and_misc(world, tmp_path):
    world.log_to(tmp_path / "access.jsonl")
    try:
        async with world_session(world) as s:
            async with s.get(f"https://{MAVEN}/maven2/org/example/demo/nope/1/nope-1.pom") as r:
                assert r.status == 404 and await r.read()
            async with s.get(f"https://{MAVEN}/maven2/org/example/demo/demo-transitive/0.9.0/"
                             "demo-transitive-0.9.0.pom") as r:
                assert r.status == 200 and r.headers["Content-Type"] == "text/xml" and await r.read()
            world.maven.put("org/example/extra/1.0/extra-1.0.pom", "<project/>")
            async with s.get(f"https://{MAVEN}/maven2/org/example/extra/1.0/extra-1.0.pom") as r:
                assert await r.read() == b"<project/>"
            # wrong Host for this listener -> 421
            async with s.get(f"https://{MAVEN}/maven2/", headers={"Host": "example.com"}) as r:
                assert r.status == 421
        assert world.wait_idle(5)  # the client may act on a head before its body was sent
    finally:
        world.log_to(None)
    lines = [json.loads(x) for x in (tmp_path / "access.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == [404, 200, 200, 421]
    assert all(x["sni"] == MAVEN for x in lines) and lines[0]["request_headers"]["host"] == MAVEN
    assert lines[0]["conn_id"] == lines[1]["conn_id"]  # keep-alive reuse


async def test_publish_new_db_version(world):
    old = world.digest("db")
    art = await asyncio.to_thread(world.publish_db, 2, 1.0)
    assert art.manifest_digest != old and world.digest("db") == art.manifest_digest
    assert world.mirror.tag_digest("aquasec/trivy-db", "2") == world.ghcr.tag_digest("aquasecurity/trivy-db", "2")
    async with world_session(world) as s:
        tok = await _token(s, MIRROR, "aquasec/trivy-db")
        async with s.get(f"https://{MIRROR}/v2/aquasec/trivy-db/manifests/2",
                         headers={"Authorization": f"Bearer {tok}"}) as r:
            assert r.headers["Docker-Content-Digest"] == art.manifest_digest
        async with s.get(f"https://{MIRROR}/v2/aquasec/trivy-db/manifests/{old}",
                         headers={"Authorization": f"Bearer {tok}"}) as r:
            assert r.status == 200  # old versions stay reachable by digest


async def test_async_world_and_tunnel_proxy(tmp_path):
    """``async with World(...)`` on the test's own loop, plus the tunnel proxy."""
    from tests.emulated import TunnelProxy, TunnelProxyThread, World
    from tests.emulated.client import world_ssl_context

    async with World(tmp_path / "w", db_size_mib=0.25) as w:
        assert set(w.address_overrides) == set(w.hosts) and w.ca_pem.exists()
        assert all(v == f"127.0.0.1:{w.port(h)}" for h, v in w.address_overrides.items())
        ctx = world_ssl_context(str(w.ca_pem))
        async with TunnelProxy(w.address_overrides) as tp:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"https://{CHECK}/updates", proxy=tp.url, ssl=ctx) as r:
                    assert r.status == 200 and r.headers["Content-Type"] == "application/json"
                with pytest.raises(aiohttp.ClientError):  # not an emulated host -> 502
                    async with s.get("https://repository.apache.org/", proxy=tp.url, ssl=ctx) as r:
                        pass
            await w.refuse(CHECK)
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.ClientError):  # CONNECT target refuses -> 502
                    async with s.get(f"https://{CHECK}/updates", proxy=tp.url, ssl=ctx) as r:
                        pass
            await w.accept(CHECK)
            assert [(r.target, r.status) for r in tp.connects()] == [
                (f"{CHECK}:443", 200), ("repository.apache.org:443", 502), (f"{CHECK}:443", 502)]
        assert [e.status for e in w.requests(host=CHECK)] == [200]
        assert w.requests()[0].sni == CHECK

    # the thread-hosted variant, against a world that is gone: CONNECT -> 502
    tpt = TunnelProxyThread({CHECK: "127.0.0.1:9"})
    proxy = await asyncio.to_thread(tpt.start)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(f"CONNECT {CHECK}:443 HTTP/1.1\r\nHost: {CHECK}:443\r\n\r\n".encode())
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 15)).startswith(b"HTTP/1.1 502")
        writer.close()
    finally:
        await asyncio.to_thread(tpt.stop)
