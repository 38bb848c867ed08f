"""The layout is the architecture: data flows one way, front doors → policy → pipeline →
resources → shared (fleet) → cache → upstream, and no module imports a layer above its own. Checked on the
source (ast), so a new reach-back fails here before it becomes a habit."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "gateway"

#: top to bottom; a package may import the ones after it, never the ones before it
LAYERS = [
    {"app", "cli", "cli_state", "cli_running", "startup", "reload", "health", "admin", "workers"},
    {"proxy", "mirror", "lifecycle"},             # front doors (the prefetcher is an internal client)
    {"policy"},
    {"pipeline"},
    {"resources"},
    {"shared"},                                   # fleet coordination: Redis, S3, peers (wired by app)
    {"cache"},
    {"upstream"},
]
#: beside the path: anyone may use them, they use nothing on the path
BESIDE = {"settings", "observability", "hostport", "exchange", "tls"}


def _layer_of(name: str) -> int | None:
    for i, members in enumerate(LAYERS):
        if name in members:
            return i
    return None


def _imports(path: Path) -> set[str]:
    """Top-level gateway packages/modules imported by ``path`` (relative and absolute)."""
    rel = path.relative_to(ROOT)
    depth = len(rel.parts) - 1                     # package depth of the importing module
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.split(".")[0] == "gateway":
                    parts = node.module.split(".")[1:]
                    out.add(parts[0] if parts else "")
                continue
            up = node.level - 1                   # how many packages above the current one
            base = list(rel.parts[:depth])
            base = base[:len(base) - up] if up else base
            target = base + (node.module.split(".") if node.module else [])
            if target:
                out.add(target[0])
            else:                                 # "from .. import x": names are modules
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("gateway."):
                    out.add(a.name.split(".")[1])
    return {m.removesuffix(".py") for m in out if m}


def _sources() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_its_own(path: Path):
    rel = path.relative_to(ROOT)
    own = rel.parts[0].removesuffix(".py")
    mine = _layer_of(own)
    for target in _imports(path) - {own}:
        theirs = _layer_of(target)
        if own in BESIDE:
            assert theirs is None, f"{rel} (beside the path) imports {target}, a layer on it"
        elif mine is not None and theirs is not None:
            assert theirs >= mine, f"{rel} (layer {sorted(LAYERS[mine])}) reaches up to {target}"


def test_every_package_has_a_place():
    """A new package must be placed in LAYERS or BESIDE (that is the design decision)."""
    placed = set().union(*LAYERS) | BESIDE | {"__init__", "__main__"}
    names = {p.name.removesuffix(".py") for p in ROOT.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert names <= placed, f"unplaced: {sorted(names - placed)}"
