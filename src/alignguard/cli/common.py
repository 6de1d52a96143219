"""Shared CLI plumbing: dataclass-backed flags, `--config FILE.yaml`, flags win over the file.

Every subcommand builds its parser from its config dataclasses, so `--help` shows each field's help
text, and resolves the final config as: dataclass defaults < YAML file < explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ..io import atomic_write_text


def _base_type(tp: Any) -> Any:
    """Strip Optional[...] / X | None to the underlying type."""
    origin = get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
    return tp


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, dc_cls: type, prefix: str = "", exclude=()) -> None:
    """Add one `--flag` per dataclass field (default SUPPRESS, so only explicit flags override); skip `exclude`."""
    hints = typing.get_type_hints(dc_cls)
    group = parser.add_argument_group(dc_cls.__name__, (dc_cls.__doc__ or "").strip().split("\n")[0])
    taken = {a.dest for a in parser._actions}
    for f in dataclasses.fields(dc_cls):
        # A field shared by two configs (e.g. `seed`) gets one flag that feeds both.
        if not f.init or f.metadata.get("cli") is False or f"{prefix}{f.name}" in taken or f.name in exclude:
            continue
        tp = _base_type(hints[f.name])
        name = f"--{prefix}{f.name}"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f"{prefix}{f.name}"}
        help_text = f.metadata.get("help", "")
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        kwargs["help"] = f"{help_text} (default: {default!r})"
        if get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif tp is bool:
            kwargs["type"] = _parse_bool
            kwargs["metavar"] = "{true,false}"
        elif get_origin(tp) in (list, tuple):
            inner = get_args(tp)[0] if get_args(tp) else str
            kwargs["type"] = _base_type(inner) if _base_type(inner) in (int, float, str) else str
            kwargs["nargs"] = "+"
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        group.add_argument(name, **kwargs)


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: --config {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SystemExit(f"error: --config {p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(f"error: --config {p}: expected a mapping of option: value at the top level")
    return data


def build_dataclass(
    dc_cls: type, file_values: dict, args: argparse.Namespace, prefix: str = "", source: str = "--config"
):
    """Instantiate `dc_cls` from YAML values overridden by explicit flags; unknown YAML keys are errors."""
    names = {f.name for f in dataclasses.fields(dc_cls) if f.init}
    values = {}
    for key, val in file_values.items():
        if key in names:
            values[key] = val
    for name in names:
        if hasattr(args, f"{prefix}{name}"):
            values[name] = getattr(args, f"{prefix}{name}")
    try:
        return dc_cls(**values)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc


def check_unknown_keys(file_values: dict, dc_classes: list[type], source: str) -> None:
    known = {f.name for cls in dc_classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise SystemExit(f"error: {source}: unknown option(s) {unknown}; run with --help to see the valid ones")


def save_resolved_config(out_dir: str | os.PathLike, configs: dict[str, Any], name: str = "config.yaml") -> Path:
    """Save the resolved configs (dataclasses or dicts) beside an output, as YAML."""
    payload = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in configs.items()}
    path = Path(out_dir) / name
    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(payload, default=str)), sort_keys=False))
    return path


def add_config_subcommand(subparsers, name: str, help: str, doc: str, configs, main, excluded=None):
    """A subcommand whose flags come from `configs` (dataclasses), plus `--config FILE.yaml`.

    `excluded` maps a dataclass to field names that get no flag (set by the command itself).
    """
    parser = subparsers.add_parser(
        name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file of options (flags given here win).")
    for cls in configs:
        add_dataclass_args(parser, cls, exclude=(excluded or {}).get(cls, ()))
    parser.set_defaults(func=main)
    return parser


def resolve_configs(args, configs, overrides=None, known=None) -> tuple:
    """Build each dataclass of `configs` from defaults < `--config` YAML < explicit flags.

    `overrides` maps a dataclass to values that replace both (fields the command sets itself); `known` lists
    every dataclass whose fields the YAML file may hold (default: `configs`).
    """
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    check_unknown_keys(values, list(known or configs), getattr(args, "config", None) or "")
    out = []
    for cls in configs:
        fixed = (overrides or {}).get(cls, {})
        flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in fixed})
        out.append(build_dataclass(cls, {**values, **fixed}, flags))
    return tuple(out)
