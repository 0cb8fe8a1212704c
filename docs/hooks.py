"""MkDocs hook: lay the package out as installed, so that mkdocstrings finds `aet.training` & co.

pyproject.toml maps the top-level folders onto subpackages (`training/` -> `aet.training`, ...)
with setuptools' `package-dir`. griffe, which reads the source for mkdocstrings, looks packages
up by folder and cannot follow that mapping (nor the editable install's import hook), so before
anything is rendered this builds `build/docs/aet/...`, a tree of links that mirrors the installed
package, from the mapping itself; mkdocs.yml points the Python handler at `build/docs`. A folder
that moves or joins the mapping needs no change here.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "docs"


def package_dirs(pyproject: Path) -> dict[str, Path]:
    """`{package: folder}` from `[tool.setuptools.package-dir]`."""
    setuptools = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}


def build_tree(mapping: dict[str, Path], tree: Path) -> None:
    """Link each package's folder at its dotted place under `tree`.

    A package with mapped subpackages becomes a real folder holding links to its own files and
    subfolders, the mapped subpackages beside them; any other package is one link to its folder.
    """
    shutil.rmtree(tree, ignore_errors=True)
    for name in sorted(mapping, key=lambda n: n.count(".")):  # parents before children
        place = tree.joinpath(*name.split("."))
        children = {c.rpartition(".")[2] for c in mapping if c.rpartition(".")[0] == name}
        if not children:
            place.parent.mkdir(parents=True, exist_ok=True)
            place.symlink_to(mapping[name], target_is_directory=True)
            continue
        place.mkdir(parents=True)
        for entry in mapping[name].iterdir():
            if entry.name not in children and entry.name != "__pycache__":
                (place / entry.name).symlink_to(entry)


@event_priority(100)  # before mkdocstrings reads anything
def on_config(config):
    build_tree(package_dirs(ROOT / "pyproject.toml"), TREE)
    return config
