"""Typed command configuration: one dataclass per command, filled from flags and a TOML file.

Every field of a config dataclass becomes a flag (`code_size` -> `--code-size`). Its
`metadata["help"]` is the help text; the default is appended. A `--config FILE.toml` flag
supplies the same fields by name; explicit flags win over the file, the file over defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from aet.errors import UserError

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")


class ConfigError(UserError):
    """A configuration value is missing, unknown or of the wrong type."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """Return (inner type, is_optional) for `T` or `T | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one flag per field of `config_cls`, plus `--config` for a TOML file."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file supplying any of these fields by name (flags win)",
    )
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        base, _ = _base_type(hints[field.name])
        default = (
            field.default
            if field.default is not dataclasses.MISSING
            else field.default_factory()
            if field.default_factory is not dataclasses.MISSING
            else None
        )
        help_text = field.metadata.get("help", "")
        if "default" not in help_text:  # a help text may word its own default
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) in (list, tuple):
            item = typing.get_args(base)[0]
            kwargs.update(nargs="+", type=item)
        else:
            kwargs["type"] = base
        parser.add_argument(_flag(field.name), **kwargs)


def _coerce(config_cls: type, name: str, value: Any, hints: dict[str, Any]) -> Any:
    base, optional = _base_type(hints[name])
    if value is None and optional:
        return None
    origin = typing.get_origin(base)
    try:
        if origin in (list, tuple):
            item = typing.get_args(base)[0]
            return origin(item(v) for v in value)
        if base is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base is Path:
            return Path(value)
        if base in (int, float, str):
            if base is int and isinstance(value, float):
                raise TypeError
            return base(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config_cls.__name__}.{name}: expected {base}, got {value!r}") from exc
    return value


def config_from_mapping(config_cls: type[C], values: dict[str, Any]) -> C:
    """Build `config_cls` from a mapping (dashes or underscores), rejecting unknown keys."""
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ConfigError(
                f"unknown field {key!r} for {config_cls.__name__}; "
                f"valid fields: {', '.join(sorted(names))}"
            )
        kwargs[name] = _coerce(config_cls, name, value, hints)
    return config_cls(**kwargs)


def config_from_args(config_cls: type[C], args: argparse.Namespace) -> C:
    """Merge defaults, the optional TOML file and explicit flags into one `config_cls`."""
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None)
    if config_file is not None:
        try:
            values.update(tomllib.loads(Path(config_file).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    names = {f.name for f in dataclasses.fields(config_cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return config_from_mapping(config_cls, values)
