"""Building one config section from its values: unknown keys refused with a did-you-mean hint,
each value checked against its dataclass field (an int accepted where a float is due, YAML's
3e-3 string read as a float, lists and mappings checked by kind), then the section's own
``validate``. rlbench/config.py builds every section (core, plugin, hook) with it."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any


class ConfigError(ValueError):
    """A config the run refuses before it starts. Public name: ``rlbench.config.ConfigError``."""


# Users catch and read it as rlbench.config.ConfigError (tracebacks, the benchmarks' failure lines);
# where the class happens to be defined is not part of that name.
ConfigError.__module__ = "rlbench.config"


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid) or '(none)'}"


def _check_type(section: str, key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads 3e-3 (no dot) as a string: accept what float() accepts
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"config: {section}.{key} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    if tp is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"config: {section}.{key} must be a list, got {type(value).__name__} {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"config: {section}.{key} must be a mapping, got {type(value).__name__} {value!r}")
    return value


def build_section(section: str, cls: type, values: dict | None, *, ignore: tuple = ()) -> Any:
    values = dict(values or {})
    if not isinstance(values, dict):
        raise ConfigError(f"config: section {section!r} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key in ignore:
            continue
        if key not in fields:
            raise ConfigError(f"config: unknown key {key!r} in section {section!r}{_suggest(key, list(fields))}")
        kwargs[key] = _check_type(section, key, value, hints[key])
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            first = str(e).split(" ", 1)[0].rstrip(":")
            where = f"{section}." if first in fields else f"section {section!r}: "
            raise ConfigError(f"config: {where}{e}") from e
    return obj
