"""``trivy-gateway bundle export|import`` on real cache directories, through the real CLI.

The caches are filled with the gateway's own stores (BlobStore fills, EntryStore entries keyed by
``resources.classify``), the commands run as subprocesses exactly as an operator runs them. The
Trivy flows over an imported bundle are in tests/test_e2e_bundle.py.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from gateway.cache import BlobStore, Entry, EntryStore
from gateway.cache.entries import FORMAT_MARKER
from gateway.lifecycle.bundle import BLOB_MEMBER, MANIFEST_NAME
from gateway.observability.metrics import Metrics
from gateway.resources import IMMUTABLE, classify
from gateway.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
SETTINGS = load_settings(env={})
TRIVY_ACCEPT = ("application/vnd.docker.distribution.manifest.v2+json,"
                "application/vnd.oci.image.manifest.v1+json")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("TRIVY_GATEWAY_")})


def open_stores(data_dir: Path) -> tuple[BlobStore, EntryStore]:
    root = data_dir / "cache"
    blobs = BlobStore(root, SETTINGS.cache.max_size, 0, Metrics())
    blobs.open()
    entries = EntryStore(root, blobs, SETTINGS.cache.memory, Metrics())
    entries.open()
    return blobs, entries


def key_of(method: str, host: str, path: str, accept: str = "") -> str:
    headers = {"accept": accept} if accept else {}
    return classify(method, host, path, "", headers, SETTINGS.cache, scheme="https").cache_key


def _entry(key: str, kind: str, digest: str, size: int, meta: dict, *, validated_at: float,
           immutable: bool = True) -> Entry:
    return Entry(key=key, kind=kind, status=200, headers=[("Content-Type", "application/x")],
                 body_digest=digest, body_size=size, validated_at=validated_at,
                 fresh_until=IMMUTABLE if immutable else validated_at + 3600, meta=meta)


def write_file_blob(blobs: BlobStore, size: int, seed: int) -> str:
    """A blob of ``size`` pseudo-random bytes, written in chunks (never whole in memory)."""
    fill = blobs.begin_fill(None, size)
    block = hashlib.sha256(str(seed).encode()).digest() * 32768  # 1 MiB
    left = size
    while left:
        n = min(left, len(block))
        fill.write(block[:n])
        left -= n
    return fill.commit()


def populate(data_dir: Path, layer_size: int = 300_000, *, validated_at: float | None = None,
             seed: int = 1) -> dict:
    """A cache holding one trivy-db generation (tag, manifest, layer), a POM and a VEX answer."""
    async def go() -> dict:
        blobs, entries = open_stores(data_dir)
        when = validated_at or time.time()
        layer = write_file_blob(blobs, layer_size, seed)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.aquasec.trivy.config.v1+json",
                       "digest": "sha256:" + "0" * 64, "size": 2},
            "layers": [{"mediaType": "application/vnd.aquasec.trivy.db.layer.v1.tar+gzip",
                        "digest": layer, "size": layer_size}],
            "annotations": {"org.opencontainers.image.created": "2026-11-28T18:00:00Z",
                            "seed": str(seed)},
        }).encode()
        mdigest = blobs.put_bytes(manifest)
        ref = "mirror.gcr.io/aquasec/trivy-db"
        tag_key = key_of("GET", "mirror.gcr.io", "/v2/aquasec/trivy-db/manifests/2", TRIVY_ACCEPT)
        await entries.put(_entry(tag_key, "oci_manifest", mdigest, len(manifest),
                                 {"artifact": "vulnerability_db", "reference": f"{ref}:2"},
                                 validated_at=when, immutable=False))
        await entries.put(_entry(key_of("GET", "mirror.gcr.io", f"/v2/aquasec/trivy-db/blobs/{layer}"),
                                 "oci_blob", layer, layer_size,
                                 {"artifact": "vulnerability_db", "reference": f"{ref}@{layer}"},
                                 validated_at=when))
        pom = b"<project>demo</project>"
        pom_path = "/maven2/org/example/demo/demo-lib/1.2.3/demo-lib-1.2.3.pom"
        await entries.put(_entry(key_of("GET", "repo.maven.apache.org", pom_path), "maven",
                                 blobs.put_bytes(pom), len(pom), {}, validated_at=when))
        vex = b'{"vex": true}'
        vex_key = key_of("GET", "raw.githubusercontent.com",
                         "/aquasecurity/vexhub/main/vex-repository.json")
        await entries.put(_entry(vex_key, "github", blobs.put_bytes(vex), len(vex), {},
                                 validated_at=when, immutable=False))
        return {"layer": layer, "manifest": mdigest, "tag_key": tag_key}
    return asyncio.run(go())


def cache_files(data_dir: Path) -> set[str]:
    """The cache's content files (not its bookkeeping: the operator-change signal and the key
    format marker, which a bundle or cache command writes on a cache that had none)."""
    root = data_dir / "cache"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
            and p.name not in (".operator-changed", FORMAT_MARKER)}


def export(src: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    res = run_cli("bundle", "export", "--data-dir", str(src), "-o", str(out), *flags)
    assert res.returncode == 0, res.stderr
    return res


def refused(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 1, res.stderr
    assert "refused" in res.stderr and "Nothing was imported" in res.stderr, res.stderr
    for w in words:
        assert w in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------
def test_export_import_round_trip(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    facts = populate(src)
    out = tmp_path / "b.tar"
    res = export(src, out, "--maven", "--vex")
    assert "export:" in res.stderr and "exported 4 entries and 4 blobs" in res.stderr, res.stderr
    with tarfile.open(out) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile(MANIFEST_NAME))
    assert names[0] == MANIFEST_NAME and names[-1] == "manifest.sha256" and len(names) == 10
    assert manifest["artifacts"][0]["reference"] == "mirror.gcr.io/aquasec/trivy-db:2"
    assert manifest["artifacts"][0]["manifest_digest"] == facts["manifest"]
    assert manifest["artifacts"][0]["layers"][0]["digest"] == facts["layer"]
    assert manifest["gateway_version"] and manifest["created_at"].endswith("Z")
    res = run_cli("bundle", "import", "--data-dir", str(dst), str(out))
    assert res.returncode == 0, res.stderr
    assert "import:" in res.stderr and "imported 4 entries" in res.stderr, res.stderr
    assert cache_files(dst) == cache_files(src)

    async def check():
        blobs, entries = open_stores(dst)
        entry, _ = await entries.get(facts["tag_key"])
        assert entry.body_digest == facts["manifest"]
        assert blobs.verify(facts["layer"])
    asyncio.run(check())


def test_export_selects_artifacts_only_by_default(tmp_path):
    src = tmp_path / "src"
    populate(src)
    out = tmp_path / "b.tar"
    export(src, out)
    with tarfile.open(out) as tar:
        manifest = json.load(tar.extractfile(MANIFEST_NAME))
    assert manifest["counts"] == {"oci_manifest": 1, "oci_blob": 1}
    res = run_cli("bundle", "export", "--data-dir", str(src), "-o", str(tmp_path / "x.tar"),
                  "--artifacts", "trivy-java-db")
    assert res.returncode == 1 and "nothing to export" in res.stderr, res.stderr
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "x.tar.partial").exists()
    res = run_cli("bundle", "export", "--data-dir", str(src), "-o", str(tmp_path / "y.tar"),
                  "--artifacts", "trivy-dbx")
    assert res.returncode == 1 and "unknown artifact 'trivy-dbx'" in res.stderr, res.stderr


def _member_offset(bundle: Path, pred) -> int:
    with tarfile.open(bundle) as tar:
        for m in tar.getmembers():
            if pred(m.name):
                return m.offset_data + m.size // 2
    raise AssertionError("member not found")


@pytest.mark.parametrize("where", ["blob", "entry", "manifest"])
def test_one_flipped_byte_is_refused_and_nothing_is_stored(tmp_path, where):
    src, dst = tmp_path / "src", tmp_path / "dst"
    populate(src)
    populate(dst, seed=7)  # the target already holds other content, which must stay as it was
    before = cache_files(dst)
    out = tmp_path / "b.tar"
    export(src, out, "--maven", "--vex")
    pred = {"blob": lambda n: BLOB_MEMBER.match(n) and n.endswith(
                json.load(tarfile.open(out).extractfile(MANIFEST_NAME))["artifacts"][0]
                ["layers"][0]["digest"][7:]),
            "entry": lambda n: n.startswith("entries/"),
            "manifest": lambda n: n == MANIFEST_NAME}[where]
    offset = _member_offset(out, pred)
    data = bytearray(out.read_bytes())
    data[offset] ^= 0x01
    out.write_bytes(bytes(data))
    res = run_cli("bundle", "import", "--data-dir", str(dst), str(out))
    refused(res)
    assert "digest" in res.stderr or "JSON" in res.stderr or "invalid member" in res.stderr \
        or "not a trivy-gateway bundle" in res.stderr, res.stderr
    assert cache_files(dst) == before
    assert list((dst / "cache" / "tmp").iterdir()) == []


def test_truncated_bundle_is_refused_and_nothing_is_stored(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    populate(src)
    out = tmp_path / "b.tar"
    export(src, out, "--maven", "--vex")
    full = out.read_bytes()
    with tarfile.open(out) as tar:
        boundaries = [m.offset for m in tar.getmembers()][-2:]
    # inside a body; at the boundaries before the last two members (a bundle cut between files)
    for cut in (len(full) // 2, *boundaries):
        out.write_bytes(full[:cut])
        res = run_cli("bundle", "import", "--data-dir", str(dst), str(out))
        refused(res)
        assert "truncated" in res.stderr, res.stderr
        assert cache_files(dst) == set()


def _tar_with(tmp_path: Path, members: list[tuple[str, bytes]], manifest_members: list[dict]):
    manifest = json.dumps({"format": "trivy-gateway-bundle", "format_version": 1,
                           "members": manifest_members}).encode()
    out = tmp_path / "evil.tar"
    with tarfile.open(out, "w") as tar:
        for name, data in [(MANIFEST_NAME, manifest), *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def test_path_traversal_members_are_refused(tmp_path):
    dst = tmp_path / "data" / "dst"
    body = b"x" * 100
    hexd = hashlib.sha256(body).hexdigest()
    listed = [{"name": f"blobs/sha256/{hexd}", "sha256": hexd, "size": 100}]
    # an unlisted member with a traversal name, after a valid one
    out = _tar_with(tmp_path, [(f"blobs/sha256/{hexd}", body), ("../../escaped", body)], listed)
    res = run_cli("bundle", "import", "--data-dir", str(dst), str(out))
    refused(res, "'../../escaped'", "path traversal")
    # a manifest that lists the traversal name itself
    out = _tar_with(tmp_path, [("blobs/sha256/../../../escaped", body)],
                    [{"name": "blobs/sha256/../../../escaped", "sha256": hexd, "size": 100}])
    res = run_cli("bundle", "import", "--data-dir", str(dst), str(out))
    refused(res, "invalid member")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "data" / "escaped").exists()
    assert cache_files(dst) == set()


def test_import_keeps_newer_entries_and_adds_new_generation(tmp_path):
    old, new, dst = tmp_path / "old", tmp_path / "new", tmp_path / "dst"
    old_facts = populate(old, validated_at=time.time() - 7200, seed=1)
    new_facts = populate(new, validated_at=time.time(), seed=2)
    export(old, tmp_path / "old.tar")
    export(new, tmp_path / "new.tar")
    for name in ("new.tar", "old.tar"):  # the older bundle arrives last
        res = run_cli("bundle", "import", "--data-dir", str(dst), str(tmp_path / name))
        assert res.returncode == 0, res.stderr
    assert "1 already newer" in res.stderr, res.stderr

    async def check():
        blobs, entries = open_stores(dst)
        entry, _ = await entries.get(new_facts["tag_key"])
        assert entry.body_digest == new_facts["manifest"]          # the newer tag wins
        assert blobs.has(old_facts["layer"]) and blobs.has(new_facts["layer"])  # both kept
    asyncio.run(check())


@pytest.fixture
def signing(tmp_path):
    assert shutil.which("openssl"), "openssl is required for the signature tests"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    keys = {}
    for name, key in (("ec", ec.generate_private_key(ec.SECP256R1())),
                      ("rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                      ("other", ec.generate_private_key(ec.SECP256R1()))):
        priv = tmp_path / f"{name}.key"
        pub = tmp_path / f"{name}.pub"
        priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        pub.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        keys[name] = (priv, pub)
    return keys


@pytest.mark.parametrize("kind", ["ec", "rsa", "ec-base64"])
def test_detached_signature_openssl_and_cosign_format(tmp_path, signing, kind):
    src, dst = tmp_path / "src", tmp_path / "dst"
    populate(src)
    out = tmp_path / "b.tar"
    export(src, out)
    priv, pub = signing[kind.split("-")[0]]
    sig = tmp_path / "b.sig"
    subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(priv), "-out", str(sig), str(out)],
                   check=True, timeout=30)
    if kind == "ec-base64":  # what cosign sign-blob writes
        import base64
        sig.write_bytes(base64.b64encode(sig.read_bytes()) + b"\n")
    # the wrong key: refused, nothing stored
    res = run_cli("bundle", "import", "--data-dir", str(dst), str(out), "--signature", str(sig),
                  "--public-key", str(signing["other"][1]))
    refused(res, "signature does not match")
    assert cache_files(dst) == set()
    res = run_cli("bundle", "import", "--data-dir", str(dst), str(out), "--signature", str(sig),
                  "--public-key", str(pub))
    assert res.returncode == 0 and "signature OK" in res.stderr, res.stderr
    assert cache_files(dst) == cache_files(src) - {p for p in cache_files(src)  # no POM, VEX
                                                    if p.startswith("entries/")} - {
        p for p in cache_files(src) if p.startswith("blobs/")
        and os.path.getsize(src / "cache" / p) < 100} | {
        p for p in cache_files(dst) if p.startswith("entries/")}
    assert len([p for p in cache_files(dst) if p.startswith("entries/")]) == 2


_PEAK_RSS = ("import resource, subprocess, sys\n"
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "sys.stderr.write(r.stderr)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
             "sys.exit(r.returncode)\n")


def peak_rss_mib(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run the CLI under a fresh parent whose only child it is: the child's peak RSS (VmHWM)."""
    res = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "gateway",
                          *args], cwd=str(REPO), capture_output=True, text=True, timeout=600)
    return int(res.stdout.strip() or 0) / 1024, res


def test_big_bundle_export_and_import_use_bounded_memory(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    size = 200 * 1024 * 1024
    facts = populate(src, layer_size=size)
    out = tmp_path / "big.tar"
    export_rss, res = peak_rss_mib("bundle", "export", "--data-dir", str(src), "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > size
    import_rss, res = peak_rss_mib("bundle", "import", "--data-dir", str(dst), str(out))
    assert res.returncode == 0, res.stderr
    assert "200.0 MiB" in res.stderr, res.stderr  # the big member is announced on its own line
    print(f"peak RSS: export {export_rss:.1f} MiB, import {import_rss:.1f} MiB of a "
          f"{out.stat().st_size / 2**20:.0f} MiB bundle")
    assert import_rss <= 150, f"import peaked at {import_rss:.1f} MiB RSS"
    assert export_rss <= 150, f"export peaked at {export_rss:.1f} MiB RSS"
    assert (dst / "cache" / "blobs" / "sha256" / facts["layer"][7:9] / facts["layer"][7:]
            ).stat().st_size == size


@pytest.mark.parametrize("command", ["cache-stats", "bundle-import"])
def test_operator_commands_leave_a_running_gateways_fills_alone(tmp_path, command):
    """A fill in progress (a gateway downloading the Java DB) survives an operator command run
    beside it: the commands open the store without clearing ``tmp/``."""
    src, data = tmp_path / "src", tmp_path / "data"
    populate(src)
    out = tmp_path / "b.tar"
    export(src, out)
    blobs, _ = open_stores(data)
    body = b"layer being downloaded" * 1000
    fill = blobs.begin_fill("sha256:" + hashlib.sha256(body).hexdigest(), len(body))
    fill.write(body[:1000])
    args = (["cache", "stats", "--data-dir", str(data)] if command == "cache-stats"
            else ["bundle", "import", "--data-dir", str(data), str(out)])
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    fill.write(body[1000:])
    digest = fill.commit()
    assert blobs.path_of(digest).read_bytes() == body


def test_a_bundle_larger_than_the_cache_budget_is_refused(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    populate(src, layer_size=1_500_000)          # above the smallest budget the config accepts
    out = tmp_path / "b.tar"
    export(src, out)
    cfg = tmp_path / "small.yaml"
    cfg.write_text(f"server: {{data_dir: {dst}}}\ncache: {{max_size: 1MiB, min_free_space: 0}}\n")
    res = run_cli("bundle", "import", "--config", str(cfg), str(out))
    refused(res, "more than the whole cache budget")
    assert cache_files(dst) == set()
    res = run_cli("bundle", "export", "--data-dir", str(src), "-o", str(tmp_path / "no" / "b.tar"))
    assert res.returncode == 1 and "No such file or directory" in res.stderr, res.stderr


def test_a_listed_but_malformed_entry_is_refused(tmp_path):
    dst = tmp_path / "dst"
    bad = json.dumps({"key": 42, "kind": "maven", "status": 200, "headers": [],
                      "body_digest": None, "body_size": 0, "validated_at": 1.0,
                      "fresh_until": "inf"}).encode()
    hexd = hashlib.sha256(bad).hexdigest()
    out = _tar_with(tmp_path, [(f"entries/{hexd}.json", bad)],
                    [{"name": f"entries/{hexd}.json", "sha256": hexd, "size": len(bad)}])
    res = run_cli("bundle", "import", "--data-dir", str(dst), str(out))
    refused(res, "is not a cache entry")
    assert cache_files(dst) == set()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    from gateway.lifecycle.progress import Progress

    tty, log = _Terminal(), io.StringIO()
    for stream in (tty, log):
        p = Progress("import", 10 * 2**20, stream)
        for _ in range(10):
            p.advance(2**20)
        p.finish("imported")
    assert "\r" in tty.getvalue() and "[##############################] 100%" in tty.getvalue()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and lines[-1].startswith("imported (10.0 MiB in")
    assert lines[:-1] == [f"import: {pct}% ({mib}.0 MiB of 10.0 MiB)"
                          for pct, mib in zip(range(10, 101, 10), range(1, 11))]
