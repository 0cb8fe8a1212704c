"""Layers import only downward (DESIGN.md, "One package, layered"): read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"aet": "aet", "training": "aet.training", "server": "aet.server"}
FOLDERS |= {"clients": "aet.clients", "proto": "aet.proto"}
FLOOR = {"aet.config", "aet.errors", "aet.devices", "aet.repository", "aet.runtime"}
FLOOR |= {"aet.files", "aet.encoder"}  # atomic writes; the one in-process encoder
FLOOR |= {"aet.conformal"}  # conformal p-values (numpy only): the server's p_value output
# What each layer may import of this package, besides the floor and itself.
ALLOWED = {
    "floor": set(),
    "aet.proto": set(),
    "aet.training": set(),
    "aet.server": {"aet.proto"},
    "aet.clients": {"aet.proto", "aet.training", "aet.server"},
}
NO_TORCH = ("floor", "aet.proto", "aet.server")  # `aet serve` never loads torch


def layer(module: str) -> str:
    """The layer of a module: the floor, a stage package, or the public API and entry points
    (`aet.cli`, and the `__main__` of each package, which runs it)."""
    if module.endswith(".__main__"):
        return "api"
    if module in FLOOR:
        return "floor"
    for stage in ("aet.proto", "aet.training", "aet.server", "aet.clients"):
        if module == stage or module.startswith(stage + "."):
            return stage
    return "api"


def imports() -> dict[str, set[str]]:
    """Every module of the package and the absolute imports it makes (lazy ones included)."""
    found: dict[str, set[str]] = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).glob("*.py"):
            module = package if path.stem == "__init__" else f"{package}.{path.stem}"
            names: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module)
                elif isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
            found[module] = names
    return found


def test_layers_import_only_downward():
    upward = []
    for module, names in sorted(imports().items()):
        own = layer(module)
        if own == "api":
            continue  # the public API sits on everything
        allowed = {own, "floor", *ALLOWED[own]}
        for name in sorted(names):
            if name.split(".")[0] == "torch" and own in NO_TORCH:
                upward.append(f"{module} imports {name}")
            elif name.startswith("aet") and layer(name) not in allowed:
                upward.append(f"{module} imports {name} ({layer(name)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_walk_sees_the_package():
    found = imports()
    assert {"aet.repository", "aet.server.app", "aet.training.export"} <= set(found)
    assert "aet.errors" in found["aet.config"]
