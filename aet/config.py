"""Typed command configuration: one dataclass per command, filled from flags and a TOML file.

Every field of a config dataclass becomes a flag (`code_size` -> `--code-size`). Its
`metadata["help"]` is the help text; the default is appended. A field whose type is itself a
dataclass (`data: DataSpec`) is a group: its fields become flags under their own names, so a
concept declared once keeps one spelling in every command. A `--config FILE.toml` flag supplies
the same fields by name (a group's fields flat, or as a table named after the group); explicit
flags win over the file, the file over defaults. A field with `metadata["flag"] = False` is
not configurable: its owner sets it (e.g. a group's seed taken from another group).
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


def _group(annotation: Any) -> type | None:
    """The dataclass a field's annotation names, if it is a group of fields."""
    base, _ = _base_type(annotation)
    return base if isinstance(base, type) and dataclasses.is_dataclass(base) else None


def _fields(config_cls: type) -> list[dataclasses.Field]:
    """The configurable fields of `config_cls` (not those with `metadata["flag"] = False`)."""
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("flag", True)]


def flag_names(config_cls: type) -> list[str]:
    """The names of the flags of `config_cls`: its fields, a group's fields in its place."""
    hints = typing.get_type_hints(config_cls)
    names: list[str] = []
    for field in _fields(config_cls):
        group = _group(hints[field.name])
        names += [field.name] if group is None else flag_names(group)
    return names


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one flag per field of `config_cls`, plus `--config` for a TOML file."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file supplying any of these fields by name (flags win)",
    )
    _add_fields(parser, config_cls)


def _add_fields(parser: argparse.ArgumentParser, config_cls: type) -> None:
    hints = typing.get_type_hints(config_cls)
    for field in _fields(config_cls):
        group = _group(hints[field.name])
        if group is not None:
            _add_fields(parser, group)
            continue
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
    """Build `config_cls` from a mapping (dashes or underscores), rejecting unknown keys.

    A group's fields may stand flat among the others or in a table named after the group.
    """
    values = {key.replace("-", "_"): value for key, value in values.items()}
    valid = set(flag_names(config_cls))
    hints = typing.get_type_hints(config_cls)
    kwargs = {}
    for field in _fields(config_cls):
        group = _group(hints[field.name])
        if group is None:
            if field.name in values:
                kwargs[field.name] = _coerce(config_cls, field.name, values.pop(field.name), hints)
            continue
        table = values.pop(field.name, None)
        if isinstance(table, group):
            kwargs[field.name] = table
            continue
        members = {**(table or {})}
        members.update({name: values.pop(name) for name in flag_names(group) if name in values})
        if members:
            kwargs[field.name] = config_from_mapping(group, members)
    if values:
        key = next(iter(values))
        raise ConfigError(
            f"unknown field {key!r} for {config_cls.__name__}; "
            f"valid fields: {', '.join(sorted(valid))}"
        )
    return config_cls(**kwargs)


def flat_dict(config: DataclassInstance) -> dict[str, Any]:
    """`config` as a JSON-ready mapping of its flag names (a group's fields in its place)."""
    result: dict[str, Any] = {}
    for field in _fields(type(config)):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            result.update(flat_dict(value))
        else:
            result[field.name] = str(value) if isinstance(value, Path) else value
    return result


def config_from_args(
    config_cls: type[C], args: argparse.Namespace, preset: dict[str, Any] | None = None
) -> C:
    """Merge defaults, a `preset` (e.g. a recipe), the optional TOML file and explicit flags
    into one `config_cls`, each later one winning."""
    values: dict[str, Any] = dict(preset or {})
    config_file = getattr(args, "config", None)
    if config_file is not None:
        try:
            values.update(tomllib.loads(Path(config_file).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    names = set(flag_names(config_cls))
    values.update({k: v for k, v in vars(args).items() if k in names})
    return config_from_mapping(config_cls, values)
