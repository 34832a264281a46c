"""Typed dataclass configs: defaults < YAML file < command-line flags, and the resolved config written back.

A config is a (possibly nested) dataclass. Every field becomes a flag: `--lr 3e-4`, and a field of a nested
dataclass becomes a dotted flag: `--grpo.lr 3e-4`. A YAML file mirrors the same nesting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message says which and what to do."""


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with the one-line help that `--help` prints: `lr: float = opt(5e-5, "peak learning rate")`;
    mutable defaults go through `factory` (`tasks: list[str] = opt(factory=lambda: ["arithmetic"], help=...)`)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp):
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp, name: str):
    """Convert a YAML or command-line value to the field's declared type, or raise ConfigError."""
    inner, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or value is None and inner is Any:
            return None
        raise ConfigError(f"{name} must not be empty (expected {getattr(inner, '__name__', inner)})")
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # inf or nan in a learning rate, weight or clip turns weights into NaN
                raise ConfigError(f"{name} must be a finite number (got {value!r})")
            return number
        if inner is str:
            return str(value)
        if origin is typing.Literal:
            choices = typing.get_args(inner)
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))} (got {value!r})")
            return value
        if origin in (list, tuple):
            (elem,) = typing.get_args(inner)[:1] or (Any,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            out = [_coerce(v, elem, name) if elem is not Any else v for v in value]
            return out if origin is list else tuple(out)
        if origin is dict or inner is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError
            kv = typing.get_args(inner)
            if len(kv) == 2 and kv[1] is not Any:  # e.g. dict[str, dict]: each value is checked too
                return {k: _coerce(v, kv[1], f"{name}.{k}") for k, v in value.items()}
            return dict(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, json.JSONDecodeError):
        raise ConfigError(f"{name} expects {getattr(inner, '__name__', inner)} (got {value!r})") from None
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build a dataclass from a nested dict, rejecting unknown keys with the list of known ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping (got {type(data).__name__})")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # cls is a dataclass
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))}; "
            f"known keys: {', '.join(prefix + k for k in fields)}"
        )
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        inner, _ = _strip_optional(tp)
        if isinstance(inner, type) and dataclasses.is_dataclass(inner) and isinstance(value, dict):
            kwargs[key] = from_dict(inner, value, prefix + key + ".")
        elif (
            isinstance(inner, type)
            and dataclasses.is_dataclass(inner)
            and value is not None
            and not isinstance(value, inner)
        ):
            raise ConfigError(
                f"{prefix + key} is a group of settings, not {value!r}: give it a mapping of its "
                f"keys in the YAML, or dotted flags (--{prefix + key}.NAME VALUE)"
            )
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def require_finite(cfg, prefix: str = "") -> None:
    """Refuse inf and nan anywhere in a config (nested, and in lists): they turn weights into NaN silently."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            require_finite(value, prefix + f.name + ".")
            continue
        for x in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"{prefix}{f.name} must be a finite number (got {x})")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def merge(cfg: T, updates: dict, prefix: str = "") -> T:
    """A copy of `cfg` with nested `updates` applied (same validation as `from_dict`)."""
    base = to_dict(cfg)

    def deep(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = deep(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return out

    return from_dict(type(cfg), deep(base, updates), prefix)


def _walk(cls, prefix=""):
    """Yield (dotted_name, type, help, default) for every leaf field of a nested dataclass."""
    hints = _field_types(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            yield from _walk(inner, prefix + f.name + ".")
        else:
            yield prefix + f.name, tp, f.metadata.get("help", ""), getattr(defaults, f.name)


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per leaf field (`--a.b` for nested fields, `--a-b` also accepted); values are parsed later."""
    group = parser.add_argument_group(f"{cls.__name__} (defaults < --config YAML < flags)")
    for name, tp, help_text, default in _walk(cls):
        if name in skip:
            continue
        flags = ["--" + name.replace("_", "-")]
        if "_" in name:
            flags.append("--" + name)
        shown = json.dumps(default) if isinstance(default, (list, dict)) else default
        group.add_argument(
            *flags,
            dest="cfg::" + name,
            default=None,
            metavar="V",
            help=f"{help_text} [{_type_name(tp)}, default {shown}]".strip().replace("%", "%%"),
        )


def _type_name(tp) -> str:
    inner, optional = _strip_optional(tp)
    name = getattr(inner, "__name__", str(inner).replace("typing.", ""))
    return name + (" or none" if optional else "")


def resolve(cls: type[T], args: argparse.Namespace, config_file: str | None = None, base: T | None = None) -> T:
    """Defaults (or `base`) < YAML file < flags that were given on the command line."""
    cfg = base if base is not None else cls()
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(
                f"--config {path} is a directory; give a YAML file"
                if path.is_dir()
                else f"--config file not found: {path}"
            )
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"--config {path} is not a text file (not UTF-8); give a YAML file") from None
        except yaml.YAMLError as e:  # its message spans lines (the line and a caret under the column)
            mark = getattr(e, "problem_mark", None)
            where = (
                f"{getattr(e, 'problem', None) or 'syntax error'} at line {mark.line + 1}, column {mark.column + 1}"
                if mark is not None
                else " ".join(str(e).split())
            )
            raise ConfigError(f"--config {path} is not valid YAML: {where}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"--config {path} holds a YAML {type(data).__name__}, not a mapping of settings "
                f"(write key: value lines, e.g. 'steps: 100')"
            )
        cfg = merge(cfg, data)
    updates: dict = {}
    for key, value in vars(args).items():
        if not key.startswith("cfg::") or value is None:
            continue
        node = updates
        parts = key[5:].split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return merge(cfg, updates) if updates else cfg


def save(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
