"""Freshness records: ``metadata.json`` read from a DB layer only when it is cheap (within the
budget of unpacked bytes), the served age from UpdatedAt, and the records surviving a restart."""
from __future__ import annotations

import io
import json
import os
import tarfile

from gateway.lifecycle.freshness import Freshness, Generation, read_db_metadata
from gateway.observability.metrics import Metrics

META = {"Version": 2, "UpdatedAt": "2026-11-28T18:00:00Z", "NextUpdate": "2026-11-29T00:00:00Z"}


def layer(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_metadata_read_when_it_comes_early_and_not_past_the_budget(tmp_path):
    meta = json.dumps(META).encode()
    early = layer(tmp_path / "early.tar.gz", [("trivy.db", b"x" * 4096), ("metadata.json", meta)])
    assert read_db_metadata(early) == META
    late = layer(tmp_path / "late.tar.gz", [("trivy.db", os.urandom(64 * 1024)),
                                            ("metadata.json", meta)])
    assert read_db_metadata(late, budget=32 * 1024) is None  # gave up before unpacking the DB
    assert read_db_metadata(late) == META
    (tmp_path / "junk").write_bytes(b"not a tar.gz")
    assert read_db_metadata(tmp_path / "junk") is None


def test_records_survive_a_restart_and_age_counts_from_updated_at(tmp_path):
    now = [1795888800.0 + 3600]  # 2026-11-28T19:00:00Z, an hour after UpdatedAt
    f = Freshness(tmp_path / "state.json", Metrics(), clock=lambda: now[0])
    f.load({"vulnerability_db": "mirror.gcr.io/aquasec/trivy-db:2"})
    state = f.artifacts["vulnerability_db"]
    state.served_digest = state.upstream_digest = "sha256:" + "a" * 64
    state.generations = [Generation(state.served_digest, ["sha256:" + "b" * 64], 10, now[0] - 60,
                                    META["UpdatedAt"], META["NextUpdate"])]
    f.save()
    again = Freshness(tmp_path / "state.json", Metrics(), clock=lambda: now[0])
    again.load({"vulnerability_db": "mirror.gcr.io/aquasec/trivy-db:2"})
    (view,) = again.status()
    assert view["served_digest"] == state.served_digest and view["behind_upstream"] is False
    assert view["updated_at"] == META["UpdatedAt"] and view["next_update"] == META["NextUpdate"]
    assert view["served_age_seconds"] == 3600
    # another reference for the same name: the old records do not apply
    other = Freshness(tmp_path / "state.json", Metrics(), clock=lambda: now[0])
    other.load({"vulnerability_db": "ghcr.io/aquasecurity/trivy-db:2"})
    assert other.status()[0]["served_digest"] is None
