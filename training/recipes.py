"""Recipes: named `aet pretrain` presets, shipped as TOML files in `training/recipes/`.

`aet pretrain --recipe NAME` starts from `recipes/NAME.toml`; a `--config` file and explicit
flags override it field by field. Each file says in comments what it is for and what its choice
rests on (the measurements are in the README's results table).
"""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any

from aet.config import ConfigError


def recipe_names() -> list[str]:
    """The shipped recipes, by name."""
    folder = resources.files("aet.training") / "recipes"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load_recipe(name: str) -> dict[str, Any]:
    """The fields recipe `name` sets; ConfigError naming the valid recipes for an unknown one."""
    names = recipe_names()
    if name not in names:
        raise ConfigError(f"recipe: unknown recipe {name!r}; valid recipes: {', '.join(names)}")
    text = (resources.files("aet.training") / "recipes" / f"{name}.toml").read_text()
    return tomllib.loads(text)
