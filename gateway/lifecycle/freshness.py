"""Freshness you can see: per artifact, what upstream has, what the gateway serves, how old.

The prefetcher records every check here; this module turns the records into metrics (updated on
every check, so the age keeps growing even when no scanner asks) and the ``lifecycle`` part of
``/api/status``. The state is persisted (``<data_dir>/lifecycle/prefetch.json``) so the
generations kept per artifact survive a restart.

Where ``UpdatedAt``/``NextUpdate`` come from: the DB's own ``metadata.json`` when it can be read
without unpacking the whole layer (:func:`read_db_metadata` reads the cached layer as a stream and
gives up once it is past :data:`METADATA_BUDGET` unpacked bytes — the file usually sits after
the large database), else the manifest's ``org.opencontainers.image.created`` annotation, which
the publisher sets at the same time as ``UpdatedAt``. ``next_update`` stays null when neither
says.
"""
from __future__ import annotations

import json
import os
import tarfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from ..observability.logging import get_logger
from ..observability.metrics import Metrics

log = get_logger("gateway.lifecycle")

CREATED_ANNOTATION = "org.opencontainers.image.created"
#: not a standard annotation; read when a publisher sets it
NEXT_UPDATE_ANNOTATIONS = ("org.opencontainers.image.next-update", "NextUpdate")


#: how far into an unpacked layer :func:`read_db_metadata` looks for ``metadata.json``
METADATA_BUDGET = 16 * 1024 * 1024


def read_db_metadata(path: Path, budget: int = METADATA_BUDGET) -> Optional[dict]:
    """``metadata.json`` of a Trivy DB layer (tar.gz), or None when it is not within ``budget``
    unpacked bytes (or the layer is not a tar.gz). Blocking: run it in a thread."""
    try:
        with tarfile.open(path, mode="r|gz") as tar:
            for member in tar:
                if member.name.removeprefix("./") == "metadata.json" and member.isfile() \
                        and member.size <= 1024 * 1024:
                    doc = json.loads(tar.extractfile(member).read())
                    return doc if isinstance(doc, dict) else None
                if member.offset_data + member.size > budget:
                    return None
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return None
    return None


@dataclass
class Generation:
    """One version of an artifact: the manifest (or archive) digest and its layers."""

    digest: str
    layers: list[str] = field(default_factory=list)
    size: int = 0
    first_seen: float = 0.0
    created: Optional[str] = None
    next_update: Optional[str] = None


@dataclass
class ArtifactState:
    name: str
    reference: str
    upstream_digest: Optional[str] = None
    checked_at: Optional[float] = None
    #: when upstream was first seen pointing at a digest the gateway did not serve yet
    upstream_changed_at: Optional[float] = None
    served_digest: Optional[str] = None
    fetched_at: Optional[float] = None
    last_result: str = ""
    last_error: str = ""
    last_success: Optional[float] = None
    consecutive_failures: int = 0
    #: newest first, at most ``lifecycle.prefetch.keep``
    generations: list[Generation] = field(default_factory=list)

    @property
    def behind(self) -> bool:
        return bool(self.upstream_digest and self.upstream_digest != self.served_digest)

    def served_generation(self) -> Optional[Generation]:
        return next((g for g in self.generations if g.digest == self.served_digest), None)


def parse_time(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Freshness:
    """The records of every watched artifact, their metrics and their status view."""

    def __init__(self, path: Path, metrics: Metrics, clock=time.time) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.clock = clock
        self.artifacts: dict[str, ArtifactState] = {}

    def load(self, names: dict[str, str]) -> None:
        """Records for ``names`` (artifact → reference), from disk when the file has them."""
        saved: dict = {}
        try:
            saved = json.loads(self.path.read_text("utf-8"))
        except (OSError, ValueError):
            pass
        for name, reference in names.items():
            rec = saved.get(name) if isinstance(saved, dict) else None
            state = ArtifactState(name, reference)
            if isinstance(rec, dict) and rec.get("reference") == reference:
                try:
                    gens = [Generation(**g) for g in rec.get("generations") or []]
                    state = ArtifactState(**{**rec, "generations": gens})
                except TypeError:
                    log.warning("prefetch_state_unreadable", artifact=name)
            self.artifacts[name] = state
            self.update_metrics(state)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: asdict(s) for n, s in self.artifacts.items()}, indent=1),
                       encoding="utf-8")
        os.replace(tmp, self.path)

    def served_age(self, state: ArtifactState) -> Optional[float]:
        """Age of the served generation: from its ``created`` annotation, else from when the
        gateway first saw it."""
        gen = state.served_generation()
        if gen is None:
            return None
        born = parse_time(gen.created) or gen.first_seen or state.fetched_at
        return max(0.0, self.clock() - born) if born else None

    def update_metrics(self, state: ArtifactState) -> None:
        m, name = self.metrics, state.name
        m.artifact_upstream_newer.labels(name).set(1 if state.behind else 0)
        m.prefetch_consecutive_failures.labels(name).set(state.consecutive_failures)
        if state.last_success:
            m.prefetch_last_success.labels(name).set(state.last_success)
        age = self.served_age(state)
        if age is not None:
            m.artifact_served_age.labels(name).set(age)

    def refresh_metrics(self) -> None:
        for state in self.artifacts.values():
            self.update_metrics(state)

    def status(self) -> list[dict]:
        now = self.clock()
        out = []
        for state in self.artifacts.values():
            gen = state.served_generation()
            out.append({
                "artifact": state.name,
                "reference": state.reference,
                "upstream_digest": state.upstream_digest,
                "upstream_checked_at": state.checked_at,
                "upstream_checked_ago_seconds": now - state.checked_at if state.checked_at else None,
                "served_digest": state.served_digest,
                "served_fetched_at": state.fetched_at,
                "served_age_seconds": self.served_age(state),
                "updated_at": gen.created if gen else None,
                "next_update": gen.next_update if gen else None,
                "behind_upstream": state.behind,
                "behind_since": state.upstream_changed_at if state.behind else None,
                "last_result": state.last_result,
                "last_error": state.last_error or None,
                "consecutive_failures": state.consecutive_failures,
                "generations": [{"digest": g.digest, "size": g.size, "first_seen": g.first_seen,
                                 "created": g.created} for g in state.generations],
            })
        return out
