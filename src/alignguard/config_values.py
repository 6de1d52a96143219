"""Typed conversion of config values: one converter for command-line flags, YAML files and `method@field=value`.

Lives outside the CLI so recipes (e.g. compare's `method_spec`) can use it without importing the CLI.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin

_NONE_WORDS = ("none", "null")


def split_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for Optional[X] / X | None, else (tp, False)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def is_config_class(tp: Any) -> bool:
    """A dataclass type (a nested config), as opposed to a value type."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false (yes/no, on/off, 1/0), got {value!r}")


def _convert_scalar(value: Any, tp: Any) -> Any:
    if get_origin(tp) is Literal:
        choices = list(get_args(tp))
        for choice in choices:  # exact match: `AlignGuard` is not `alignguard`, the YAML 1 is not "1"
            if value == choice and type(value) is type(choice):
                return choice
        raise ValueError(f"{value!r} is not one of {choices}")
    if tp is bool:
        return _parse_bool(value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `2e-3` (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a folder named 2024
        raise ValueError(f"expected a string, got {value!r}")
    raise TypeError(f"no converter for fields of type {tp!r}")


def convert_value(value: Any, tp: Any) -> Any:
    """`value` (a flag string or a YAML value) as a value of the field type `tp`; ValueError says why not."""
    inner, optional = split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional:
            return None
        raise ValueError("must be set (null / None is not allowed here)")
    if get_origin(inner) in (list, tuple):
        item_tp = (get_args(inner) or (str,))[0]
        items = value if isinstance(value, (list, tuple)) else [value]
        converted = []
        for i, item in enumerate(items):
            try:
                converted.append(_convert_scalar(item, item_tp))
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from exc
        return converted
    return _convert_scalar(value, inner)


def require_at_least(config, names, low: int = 1) -> None:
    """ValueError naming the first of `names` whose value on `config` is below `low` (the configs' range checks)."""
    for name in names:
        value = getattr(config, name)
        if value < low:
            raise ValueError(f"{name}: must be >= {low}, got {value}")


def require_whole_number(config, names, low: int = 1) -> None:
    """ValueError naming the first of `names` that is not an int >= `low` (bools and floats refused: a count given
    as 2.5 or True is a mistake, not a value to round)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: must be a whole number >= {low}, got {value!r}")


def require_positive(config, names) -> None:
    """ValueError naming the first of `names` whose value on `config` is not > 0."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name}: must be > 0, got {value}")
