"""The loader: a parsed params mapping to a `Config`, every problem named by its key in one `ConfigError`."""

from __future__ import annotations

import dataclasses
import functools
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from pipeline.config.rules import RULES
from pipeline.config.sections import Config


class ConfigError(ValueError):
    """Raised with every problem found in a params mapping, one per line."""


def read_params(path: str | Path) -> dict[str, Any]:
    """Parse a params YAML file into a mapping, naming the file on a syntax error."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: params file not found; run from the project root") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def load_config(raw: Mapping[str, Any]) -> Config:
    """Build a `Config` from a parsed params mapping; raise one `ConfigError` listing every problem.

    Each key is checked alone first (known, present, typed, within the bound declared at its field); the cross-key
    rules then run on the keys that passed, so a bad value gives one error naming its key and never an exception
    of another kind from a rule that read it."""
    errors: list[str] = []
    config = _build(Config, raw, "", errors)
    if config is not None:
        bad = {line.split(":", 1)[0] for line in errors}
        errors += [error for rule in RULES if _passed(config, rule.keys, bad) for error in rule.check(config)]
    if errors:
        raise ConfigError("invalid params:\n  " + "\n  ".join(errors))
    return config


def _passed(config: Config, keys: tuple[str, ...], bad: set[str]) -> bool:
    """Whether every key a rule reads passed its own check (and its section was built)."""
    return not any(key in bad or key.split(".")[0] in bad or getattr(config, key.split(".")[0]) is None for key in keys)


def within(number: float, rule: str) -> bool:
    """Whether `number` lies in the range `rule` (as `bounded` takes it); NaN lies in none."""
    if rule.startswith((">", "<")):
        op, limit = rule.split()
        return {">": number > float(limit), ">=": number >= float(limit)}[op]
    low, high = (float(x) for x in rule[4:-1].split(","))
    above = number >= low if rule[3] == "[" else number > low
    below = number <= high if rule[-1] == "]" else number < high
    return above and below


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config dataclass into dotted keys (`sft.lr`) for tracking."""
    flat: dict[str, Any] = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            flat.update(flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    where = prefix.rstrip(".") or "params"
    if not isinstance(raw, Mapping):
        errors.append(f"{where}: expected a mapping, got {_describe(raw)}")
        return None
    hints = type_hints(cls)
    fields = {item.name: item for item in dataclasses.fields(cls)}
    for key in raw:
        if key not in hints:
            errors.append(f"{prefix}{key}: unknown key; valid keys here: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, item in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            errors.append(f"{key}: missing")
            continue
        found = len(errors)
        values[name] = _coerce(hints[name], raw[name], key, errors)
        limit = item.metadata.get("bound")
        if limit and len(errors) == found and _is_number(values[name]) and not within(values[name], limit):
            errors.append(f"{key}: {values[name]} is out of range; it must be {limit}")
    if len(values) < len(fields):
        return None
    return cls(**values)


type_hints = functools.cache(get_type_hints)  # resolving the string annotations is most of a load's time


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _coerce(kind: Any, value: Any, key: str, errors: list[str]) -> Any:
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key + ".", errors)
    origin = get_origin(kind)
    if origin is Literal:
        options = get_args(kind)
        if value not in options:
            errors.append(f"{key}: {value!r} is not one of {', '.join(repr(o) for o in options)}")
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(kind):
            if option is type(None) and value is None:
                return None
            if option is not type(None) and _matches(option, value):
                return _coerce(option, value, key, [])
        errors.append(f"{key}: expected {_name(kind)}, got {_describe(value)}")
        return value
    if not _matches(kind, value):
        errors.append(f"{key}: expected {_name(kind)}, got {_describe(value)}")
        return value
    return float(value) if kind is float else value


def _matches(kind: Any, value: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        if isinstance(value, str):
            return bool(_FLOAT_TEXT.match(value))
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if get_origin(kind) is Literal:
        return value in get_args(kind)
    return False


def _name(kind: Any) -> str:
    if get_origin(kind) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _name(a) for a in get_args(kind))
    return getattr(kind, "__name__", str(kind))


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"
