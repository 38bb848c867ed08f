"""A cache directory written by a gateway of the first key format (no scheme, no forwarded query
in the keys: 8a90204 and before), opened by the current one.

The old directory is written here the way that gateway wrote it (``git show
8a90204:gateway/cache/entries.py``, ``…/pipeline/fetch.py``, ``…/resources/oci.py``): bodies as
content-addressed files under ``blobs/sha256/``, one JSON entry per key named by the sha256 of
the key. Then the current start-up sequence opens it (:mod:`gateway.cache.keyformat`, as
``gateway.app`` does) and real requests go through the pipeline to the emulated upstreams over
real TLS (the pattern of test_pipeline_freshness.py); the upstreams' access log says whether
anything was fetched."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gateway.cache.entries import FORMAT_MARKER
from gateway.resources import classify
from gateway.resources.legacy import KEY_FORMAT, is_legacy_key, upgrade_key
from gateway.settings import load_settings
from tests.emulated.world import GHCR, MIRROR
from tests.test_gateway_cache import get as proxy_get
from tests.test_pipeline_freshness import (  # noqa: F401 - the world and make fixtures are shared
    MANIFEST_ACCEPT, Clock, Harness, make, world)

MAVEN = "repo.maven.apache.org"
POM = "/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom"
#: MANIFEST_ACCEPT as the old ``normalise_accept`` wrote it into keys (sorted, no parameters)
OLD_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json,application/vnd.oci.image.manifest.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
NOW = Clock().now


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_old_entry(root: Path, key: str, kind: str, body: bytes, *, meta: dict,
                    headers: list[tuple[str, str]], fresh_for: float = float("inf")) -> Path:
    """One entry as the first-format gateway left it: ``FetchJob._store`` published the body
    (tmp + rename to ``blobs/sha256/<2>/<hex>``), then ``EntryStore.put`` wrote the entry's
    fields (that Entry had no ``vary``) as compact JSON to ``entries/<sha256(key)>.json``."""
    digest = sha(body)
    blob = root / "blobs" / "sha256" / digest[7:9] / digest[7:]
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(body)
    fresh_until = NOW + fresh_for
    doc = {"key": key, "kind": kind, "status": 200, "headers": [list(h) for h in headers],
           "body_digest": digest, "body_size": len(body), "validated_at": NOW - 60,
           "fresh_until": "inf" if fresh_until == float("inf") else fresh_until,
           "stored_at": NOW - 60, "etag": f'"{digest}"', "last_modified": None,
           "negative": False, "meta": meta}
    path = root / "entries" / (hashlib.sha256(key.encode()).hexdigest() + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    return path


def old_db_cache(root: Path, world) -> dict[str, Path]:
    """A warm first-format cache of the vulnerability DB (its blob, its manifest by digest and
    by tag) and of the Java DB tag that ghcr.io answered by failover."""
    db, javadb = world.published["db"], world.published["javadb"]
    layer, manifest = db.layer.digest, db.manifest_digest
    blob_headers = [("Content-Type", "application/octet-stream"),
                    ("Docker-Content-Digest", layer), ("ETag", f'"{layer}"')]
    manifest_headers = [("Content-Type", OCI_MANIFEST), ("Docker-Content-Digest", manifest)]
    meta = {"host": MIRROR, "artifact": "vulnerability_db"}
    return {
        "blob": write_old_entry(
            root, f"blob|{layer}|public", "oci_blob", db.layer.read(), headers=blob_headers,
            meta={**meta, "reference": f"{MIRROR}/aquasec/trivy-db@{layer}"}),
        "manifest": write_old_entry(
            root, f"manifest|{manifest}|public", "oci_manifest", db.manifest,
            headers=manifest_headers,
            meta={**meta, "reference": f"{MIRROR}/aquasec/trivy-db@{manifest}"}),
        # fetched from the key's own host: maybe over plain HTTP, maybe with a query the key
        # dropped; nothing in the entry says which
        "tag": write_old_entry(
            root, f"tag|{MIRROR}/aquasec/trivy-db:2|{OLD_ACCEPT}|public", "oci_manifest",
            db.manifest, headers=manifest_headers, fresh_for=3600,
            meta={**meta, "reference": f"{MIRROR}/aquasec/trivy-db:2"}),
        # mirror.gcr.io failed, ghcr.io answered: failover URLs were https, without a query
        "failover_tag": write_old_entry(
            root, f"tag|{MIRROR}/aquasec/trivy-java-db:1|{OLD_ACCEPT}|public", "oci_manifest",
            javadb.manifest, fresh_for=3600,
            headers=[("Content-Type", OCI_MANIFEST),
                     ("Docker-Content-Digest", javadb.manifest_digest)],
            meta={"host": GHCR, "artifact": "java_db",
                  "reference": f"{MIRROR}/aquasec/trivy-java-db:1"}),
    }


def cache_root(tmp_path: Path) -> Path:
    return tmp_path / "gw" / "data" / "cache"


async def open_gateway(make) -> Harness:
    """The current gateway's stores and pipeline on ``tmp_path/gw`` (opening them migrates, as
    start-up does); the same data dir at every call."""
    return await make(name="gw")


def blob_url(digest: str, repo: str = "aquasec/trivy-db") -> str:
    return f"/v2/{repo}/blobs/{digest}"


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under the cache root: contents and mtime."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


async def test_warm_old_cache_answers_the_db_without_any_upstream_request(world, make,
                                                                          tmp_path):
    root = cache_root(tmp_path)
    old = old_db_cache(root, world)
    db = world.published["db"]
    world.clear_log()
    h = await open_gateway(make)
    assert h.key_migration is not None
    assert (h.key_migration.migrated, h.key_migration.dropped) == (3, 1)
    # the dropped tag's body is the manifest, still the body of the manifest by digest
    assert h.key_migration.blobs_released == 0 and h.blobs.has(db.manifest_digest)
    assert not any(p.exists() for p in old.values())        # old files renamed or removed
    assert (root / "entries" / FORMAT_MARKER).read_text().strip() == str(KEY_FORMAT)

    status, headers, body, result = await h.get(MIRROR, blob_url(db.layer.digest))
    assert (status, result) == (200, "hit") and sha(body) == db.layer.digest
    assert headers["Docker-Content-Digest"] == db.layer.digest
    status, _, body, result = await h.get(MIRROR, f"/v2/aquasec/trivy-db/manifests/{db.manifest_digest}",
                                          Accept=MANIFEST_ACCEPT)
    assert (status, result, body) == (200, "hit", db.manifest)
    javadb = world.published["javadb"]
    status, _, body, result = await h.get(MIRROR, "/v2/aquasec/trivy-java-db/manifests/1",
                                          Accept=MANIFEST_ACCEPT)
    assert (status, result, body) == (200, "hit", javadb.manifest)
    assert world.requests() == []                          # nothing reached any upstream

    # the tag fetched from its own host was dropped: fetched again, once, over HTTPS
    status, _, body, result = await h.get(MIRROR, "/v2/aquasec/trivy-db/manifests/2",
                                          Accept=MANIFEST_ACCEPT)
    assert (status, result, body) == (200, "miss", db.manifest)
    assert [r.path for r in world.requests(path_contains="/manifests/")] == [
        "/v2/aquasec/trivy-db/manifests/2"]


async def test_what_may_have_come_over_plain_http_or_with_a_query_never_answers_https(
        world, make, tmp_path):
    """A first-format entry that may have been fetched over plain HTTP (a planted tag manifest,
    a planted POM) is dropped with its body; a failover tag (fetched without a query) answers
    only a request without one (D10)."""
    root = cache_root(tmp_path)
    old_db_cache(root, world)
    planted_manifest = b'{"schemaVersion":2,"layers":[{"digest":"sha256:' + b"0" * 64 + b'"}]}'
    planted_pom = b"<project><!-- planted over plain HTTP --></project>"
    write_old_entry(root, f"tag|{MIRROR}/aquasec/trivy-checks:2|{OLD_ACCEPT}|public",
                    "oci_manifest", planted_manifest, fresh_for=3600,
                    headers=[("Content-Type", OCI_MANIFEST)], meta={"host": MIRROR})
    write_old_entry(root, f"maven|{MAVEN}{POM}", "maven", planted_pom,
                    headers=[("Content-Type", "text/xml")], meta={"host": MAVEN})
    world.clear_log()
    h = await open_gateway(make)
    assert (h.key_migration.migrated, h.key_migration.dropped) == (3, 3)
    assert h.key_migration.blobs_released == 2                # the planted bodies, nothing else
    assert h.key_migration.bytes_released == len(planted_manifest) + len(planted_pom)
    assert not h.blobs.has(sha(planted_manifest)) and not h.blobs.has(sha(planted_pom))
    assert h.blobs.has(world.published["db"].layer.digest)

    checks = world.published["checks"]
    status, _, body, result = await h.get(MIRROR, "/v2/aquasec/trivy-checks/manifests/2",
                                          Accept=MANIFEST_ACCEPT)
    assert (status, result, body) == (200, "miss", checks.manifest)
    status, _, body, result = await h.get(MAVEN, POM)
    assert status == 200 and result == "miss" and body != planted_pom
    # the migrated failover tag is the answer to the request without a query only
    javadb_tag = "/v2/aquasec/trivy-java-db/manifests/1"
    world.clear_log()
    assert (await h.get(MIRROR, javadb_tag + "?ns=docker.io", Accept=MANIFEST_ACCEPT))[3] == "miss"
    assert len(world.requests(path_contains="/manifests/1")) == 1
    assert (await h.get(MIRROR, javadb_tag, Accept=MANIFEST_ACCEPT))[3] == "hit"


async def test_second_open_does_nothing(world, make, tmp_path):
    root = cache_root(tmp_path)
    old_db_cache(root, world)
    first = await open_gateway(make)
    assert first.key_migration is not None and first.key_migration.migrated == 3
    before = snapshot(root)
    # an entry in the first format appearing later is not looked at again: the marker says done
    late = write_old_entry(root, f"blob|{sha(b'late')}|public", "oci_blob", b"late",
                           headers=[], meta={"host": MIRROR})
    before_late = snapshot(root)
    second = await open_gateway(make)
    assert second.key_migration is None
    assert snapshot(root) == before_late and late.exists()
    assert {k: v for k, v in before_late.items() if k in before} == before
    world.clear_log()
    db = world.published["db"]
    assert (await second.get(MIRROR, blob_url(db.layer.digest)))[3] == "hit"
    assert world.requests() == []


async def test_interrupted_migration_loses_nothing_and_finishes_at_the_next_start(
        world, make, tmp_path):
    """Interrupted in every place it can be: the rename of one entry fails (its temp file is a
    link into a directory that does not exist: a real I/O error), another entry was renamed but
    its old file not yet removed, a temp file was torn while written, and a dropped entry's body
    was released but the entry file not yet removed."""
    root = cache_root(tmp_path)
    old = old_db_cache(root, world)
    db = world.published["db"]
    settings = load_settings(env={}, overrides={})
    # the crash after writing the manifest's new file, before removing the old one
    new_manifest_key = classify("GET", MIRROR, f"/v2/aquasec/trivy-db/manifests/{db.manifest_digest}",
                                "", {"accept": MANIFEST_ACCEPT}, settings.cache, scheme="https").cache_key
    new_manifest = root / "entries" / (hashlib.sha256(new_manifest_key.encode()).hexdigest() + ".json")
    doc = json.loads(old["manifest"].read_text())
    new_manifest.write_text(json.dumps({**doc, "key": new_manifest_key, "vary": None}))
    (root / "entries" / "0123abcd.tmp").write_text('{"key": "torn')
    # the crash after releasing a dropped entry's body, before removing the entry
    released = write_old_entry(root, f"oci-token|{MIRROR}|/v2/token?scope=repository:x:pull",
                               "oci_auth", b'{"token":"t"}', headers=[], meta={"host": MIRROR},
                               fresh_for=60)
    token_blob = sha(b'{"token":"t"}')
    (root / "blobs" / "sha256" / token_blob[7:9] / token_blob[7:]).unlink()
    # the blob's rename fails this time (open() removes the temp file afterwards, as any)
    new_blob_key = classify("GET", MIRROR, blob_url(db.layer.digest), "", {}, settings.cache,
                            scheme="https").cache_key
    obstacle = root / "entries" / (hashlib.sha256(new_blob_key.encode()).hexdigest() + ".tmp")
    obstacle.symlink_to(tmp_path / "no-such-directory" / "x")

    first = await open_gateway(make)
    report = first.key_migration
    assert report is not None
    assert (report.migrated, report.dropped, report.failed) == (2, 2, 1)
    assert not (root / "entries" / FORMAT_MARKER).exists()   # not done: runs again next start
    assert old["blob"].exists() and first.blobs.has(db.layer.digest)   # nothing lost
    assert not old["manifest"].exists() and not old["tag"].exists() and not released.exists()
    assert not (root / "entries" / "0123abcd.tmp").exists() and not obstacle.is_symlink()

    world.clear_log()
    second = await open_gateway(make)
    assert second.key_migration is not None
    assert (second.key_migration.migrated, second.key_migration.failed) == (1, 0)
    assert (root / "entries" / FORMAT_MARKER).exists()
    files = sorted(p.name for p in (root / "entries").iterdir())
    assert len(files) == 4                   # blob, manifest, failover tag, marker: no duplicate
    assert (await second.get(MIRROR, blob_url(db.layer.digest)))[3] == "hit"
    manifest = await second.get(MIRROR, f"/v2/aquasec/trivy-db/manifests/{db.manifest_digest}",
                                Accept=MANIFEST_ACCEPT)
    assert manifest[3] == "hit" and manifest[2] == db.manifest
    assert world.requests() == []
    assert (await open_gateway(make)).key_migration is None


@pytest.mark.parametrize("old_key, kwargs, request_args", [
    (f"blob|sha256:{'a' * 64}|public", {"body_digest": f"sha256:{'a' * 64}"},
     (MIRROR, f"/v2/aquasec/trivy-db/blobs/sha256:{'a' * 64}", "", {})),
    (f"manifest|sha256:{'b' * 64}|anonymous", {"body_digest": f"sha256:{'b' * 64}"},
     ("registry.corp", f"/v2/team/app/manifests/sha256:{'b' * 64}", "", {})),
    (f"tag|{MIRROR}/aquasec/trivy-db:2|{OLD_ACCEPT}|public",
     {"body_digest": f"sha256:{'c' * 64}", "served_by": GHCR},
     (MIRROR, "/v2/aquasec/trivy-db/manifests/2", "", {"accept": MANIFEST_ACCEPT})),
])
def test_a_renamed_key_is_the_key_the_current_code_looks_up(old_key, kwargs, request_args):
    """The rename follows the current key format: if classify's keys change again, this fails
    (and the next format needs its own step)."""
    host, path, query, headers = request_args
    cfg = load_settings(env={}, overrides={"cache": {"oci": {"registries": [
        MIRROR, GHCR, "registry.corp"]}}}).cache
    assert is_legacy_key(old_key)
    new = upgrade_key(old_key, status=200, **{"served_by": None, **kwargs})
    assert new == classify("GET", host, path, query, headers, cfg, scheme="https").cache_key
    assert not is_legacy_key(new)


@pytest.mark.parametrize("old_key, served_by, body_digest", [
    (f"tag|{MIRROR}/aquasec/trivy-db:2|{OLD_ACCEPT}|public", MIRROR, f"sha256:{'c' * 64}"),
    (f"blob|sha256:{'a' * 64}|public", MIRROR, f"sha256:{'d' * 64}"),    # body not the digest
    (f"oci-ping|{GHCR}|GET", GHCR, f"sha256:{'e' * 64}"),
    (f"oci-token|{GHCR}|/token?scope=repository:x:pull", GHCR, f"sha256:{'e' * 64}"),
    (f"maven|{MAVEN}{POM}", MAVEN, f"sha256:{'e' * 64}"),
    ("github|api.github.com/repos/a/b|application/json|", "api.github.com", f"sha256:{'e' * 64}"),
    ("generic|example.com/x?y=1", "example.com", f"sha256:{'e' * 64}"),
])
def test_what_cannot_be_proven_https_is_dropped(old_key, served_by, body_digest):
    assert is_legacy_key(old_key)
    assert upgrade_key(old_key, status=200, body_digest=body_digest, served_by=served_by) is None


@pytest.mark.parametrize("key", [
    f"blob|https|sha256:{'a' * 64}|public", f"manifest|http|sha256:{'a' * 64}|public",
    f"tag|https://{MIRROR}/aquasec/trivy-db:2|{OLD_ACCEPT}|public", f"oci-ping|http://{GHCR}/v2/|GET",
    f"maven|https://{MAVEN}{POM}", "generic|http://example.com/x", "something-else|x",
])
def test_current_keys_are_not_legacy(key):
    assert not is_legacy_key(key)


async def test_gateway_started_on_an_old_cache_serves_it_and_migrates_once(clean_upstreams,
                                                                          make_gateway, tmp_path):
    """The real gateway process (its own start-up wiring) on a data dir of the first format."""
    world = clean_upstreams
    data_dir = tmp_path / "data"
    old_db_cache(data_dir / "cache", world)
    gw = make_gateway(world, data_dir=data_dir)
    db_layer = world.digest("db", "layer")
    status, headers, body = await proxy_get(gw, f"https://{MIRROR}{blob_url(db_layer)}")
    assert status == 200 and sha(body) == db_layer
    assert headers["Cache-Status"].startswith("trivy-gateway; hit")
    assert world.requests() == []
    events = [e for e in gw.log_events() if e.get("event") == "cache_keys_migrated"]
    assert [(e["migrated"], e["dropped"]) for e in events] == [(3, 1)]
    gw.stop()
    again = make_gateway(world, data_dir=data_dir, name="again")
    assert (await proxy_get(again, f"https://{MIRROR}{blob_url(db_layer)}"))[0] == 200
    assert not [e for e in again.log_events() if e.get("event") == "cache_keys_migrated"]
    assert world.requests() == []


def _old_cache_for_commands(data_dir: Path) -> str:
    """A first-format cache with a blob kept by the conversion and a POM it drops; the blob's
    digest."""
    body = b'{"layers":[]}' * 10
    write_old_entry(data_dir / "cache", f"blob|{sha(body)}|public", "oci_blob", body,
                    meta={"host": MIRROR}, headers=[("Content-Type", "application/octet-stream")])
    write_old_entry(data_dir / "cache", f"maven|{MAVEN}{POM}", "maven", b"<project/>", meta={},
                    headers=[("Content-Type", "text/xml")])
    return sha(body)


def _command(*args: str) -> "subprocess.CompletedProcess":
    import subprocess
    import sys

    from tests.gateway_harness import REPO
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=str(REPO),
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


def test_a_cache_command_after_an_upgrade_converts_the_cache_first(tmp_path):
    """`cache ls` (any cache or bundle command) run before the first `serve` of the new
    version: the entries are converted as `serve` would, so the command shows — and `bundle
    export` would write — them under the keys the gateway looks up."""
    data_dir = tmp_path / "data"
    digest = _old_cache_for_commands(data_dir)
    r = _command("cache", "ls", "--keys", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    assert "converted the cache to the current key format" in r.stderr
    assert "main: 1 kept, 1 dropped" in r.stderr
    assert f"blob|https|{digest}|public" in r.stdout and "maven|" not in r.stdout
    marker = data_dir / "cache" / "entries" / FORMAT_MARKER
    assert marker.read_text().strip() == str(KEY_FORMAT)
    again = _command("cache", "ls", "--data-dir", str(data_dir))
    assert "converted" not in again.stderr and digest[:19] in again.stdout


def test_a_cache_command_leaves_the_cache_of_a_running_gateway_alone(tmp_path):
    """While a gateway holds the data dir (here: its lock, held by this process), the command
    renames nothing under it — an older gateway still reads those keys — and says why."""
    from gateway.startup import DataDirLock

    data_dir = tmp_path / "data"
    _old_cache_for_commands(data_dir)
    before = snapshot(data_dir / "cache")
    lock = DataDirLock(load_settings(env={}, overrides={"server": {"data_dir": str(data_dir)}}))
    lock.acquire()
    try:
        r = _command("cache", "ls", "--keys", "--data-dir", str(data_dir))
    finally:
        lock.release()
    assert r.returncode == 0, r.stderr
    assert "a gateway is running on it without having converted them" in r.stderr
    assert snapshot(data_dir / "cache") == before
