"""Shared CLI plumbing: one `Command` helper turns config dataclasses into a subcommand.

Each subcommand lists its config dataclasses as `Section`s; the helper gives every field a flag (`--max_new_tokens`,
also spelled `--max-new-tokens`) with its help text, reads `--config FILE.yaml` and resolves each config as
dataclass defaults < YAML file < explicit flags. A field whose type is itself a dataclass (the demo's `train:
TrainRunConfig`) becomes a namespace: flags `--train.max_steps`, YAML `train: {max_steps: 2}`.

Flags and YAML values go through the same converter (`convert_value`): Literal choices exactly, booleans through
one parser, integers only as integers, lists of the inner type, None only for Optional fields. Two configs of one
command may not expose the same field name (one flag would silently feed both); `Command` refuses that at build
time (the command sets one of them itself instead: `Section.set_by_command` + `derive`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ..config_values import _NONE_WORDS, _parse_bool, convert_value, is_config_class, split_optional  # noqa: F401
from ..io import atomic_write_text


def _flag_converter(tp: Any) -> Callable[[str], Any]:
    """argparse `type=` for one flag value (list flags convert each item)."""
    inner, optional = split_optional(tp)
    if get_origin(inner) in (list, tuple):
        inner = (get_args(inner) or (str,))[0]

    def convert(text: str) -> Any:
        try:
            return convert_value(text, inner | None if optional else inner)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = getattr(inner, "__name__", "value")  # argparse names it in "invalid <name> value"
    return convert


# ---------------------------------------------------------------- commands


@dataclasses.dataclass(frozen=True)
class Section:
    """One config dataclass of a command.

    Args:
        name: its key in the saved config YAML (and in `Command.resolve`'s result).
        cls: the dataclass.
        set_by_command: fields the command fills in itself (no flag, no YAML key).
        derive: values of `set_by_command` fields from the sections resolved before this one.
    """

    name: str
    cls: type
    set_by_command: tuple[str, ...] = ()
    derive: Callable[[dict], dict] | None = None


def exposed_fields(cls: type, skip=()) -> list[dataclasses.Field]:
    """The fields of `cls` that get a flag and a YAML key."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli") is not False and f.name not in skip]


def _set_by_parent(f: dataclasses.Field) -> tuple[str, ...]:
    # A nested config's fields that the enclosing config fills in itself (DemoConfig.train.model, ...).
    return tuple(f.metadata.get("set_by_command", ()))


def _yaml_keys(cls: type, skip=()) -> dict[str, tuple[type, tuple] | None]:
    """YAML keys of `cls`: name -> None for a value, or (dataclass, its skipped fields) for a nested section."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: (hints[f.name], _set_by_parent(f)) if is_config_class(hints[f.name]) else None
        for f in exposed_fields(cls, skip)
    }


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _metavar(tp: Any) -> str | None:
    inner, _ = split_optional(tp)
    if get_origin(inner) in (list, tuple):
        inner = (get_args(inner) or (str,))[0]
    if get_origin(inner) is Literal:
        return "{" + ",".join(map(str, get_args(inner))) + "}"
    return {bool: "{true,false}", int: "INT", float: "FLOAT", str: "STR"}.get(inner)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "", exclude=(), default=None):
    """One `--<prefix><field>` flag per exposed field (default SUPPRESS: only explicit flags override).

    Nested dataclass fields recurse with the prefix `<field>.`; `default` is the instance whose values the help
    shows (a nested field's default_factory()).
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{prefix}{cls.__name__}", (cls.__doc__ or "").strip().split("\n")[0])
    for f in exposed_fields(cls, exclude):
        shown = getattr(default, f.name) if default is not None else _default_of(f)
        if is_config_class(hints[f.name]):
            sub = hints[f.name]
            add_dataclass_args(parser, sub, f"{prefix}{f.name}.", exclude=_set_by_parent(f), default=shown)
            continue
        tp = hints[f.name]
        required = shown is dataclasses.MISSING
        text = f.metadata.get("help", "") + (" (required)" if required else f" (default: {shown!r})")
        kwargs: dict[str, Any] = {
            "dest": f"{prefix}{f.name}",
            "default": argparse.SUPPRESS,
            "help": text.replace("%", "%%"),
            "type": _flag_converter(tp),
            "metavar": _metavar(tp),
        }
        if get_origin(split_optional(tp)[0]) in (list, tuple):
            kwargs["nargs"] = "+"
        elif split_optional(tp)[0] is bool:
            kwargs.update(nargs="?", const=True)  # `--overwrite` alone means true; `--overwrite false` still works
        group.add_argument(f"--{prefix}{f.name}", **kwargs)


def add_dash_aliases(parser: argparse.ArgumentParser) -> None:
    """Accept `--max-new-tokens` wherever `--max_new_tokens` is a flag (users' scripts use both)."""
    for action in list(parser._actions):
        for opt in list(action.option_strings):
            alias = opt.replace("_", "-")
            if opt.startswith("--") and alias != opt and alias not in parser._option_string_actions:
                action.option_strings.append(alias)
                parser._option_string_actions[alias] = action


def add_flag_alias(parser: argparse.ArgumentParser, alias: str, dest: str) -> None:
    """Make `--<alias>` another spelling of the flag whose dest is `dest` (an old, un-namespaced name)."""
    if f"--{alias}" in parser._option_string_actions:
        raise ValueError(f"alias --{alias} is already a flag of its own")
    action = next(a for a in parser._actions if a.dest == dest)
    action.option_strings.append(f"--{alias}")
    parser._option_string_actions[f"--{alias}"] = action


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
    cls: type,
    file_values: dict,
    args: argparse.Namespace,
    prefix: str = "",
    source: str = "--config",
    base=None,
    fixed: dict | None = None,
    exclude=(),
):
    """`cls` from YAML values overridden by explicit flags (keys of other configs are left alone).

    YAML values are converted like flags; an error names the source and key (`--config f.yaml: method: ...`).
    `base` is an instance whose values replace the class defaults (a nested field's default_factory()); `fixed`
    holds the values the command sets itself (they win over both).
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in exposed_fields(cls, exclude):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if is_config_class(tp):
            section = file_values.get(f.name, {})
            if not isinstance(section, dict):
                raise SystemExit(f"error: {source}: {key}: expected a mapping of {tp.__name__} options")
            start = getattr(base, f.name) if base is not None else _default_of(f)
            start = None if start is dataclasses.MISSING else start
            values[f.name] = build_dataclass(tp, section, args, f"{key}.", source, start, exclude=_set_by_parent(f))
            continue
        if f.name in file_values:
            try:
                values[f.name] = convert_value(file_values[f.name], tp)
            except ValueError as exc:
                raise SystemExit(f"error: {source}: {key}: {exc}") from exc
        if hasattr(args, key):
            values[f.name] = getattr(args, key)
        if (
            f.name not in values
            and f.name not in (fixed or {})
            and base is None
            and _default_of(f) is dataclasses.MISSING
        ):
            raise SystemExit(f"error: --{key} is required (a flag, or `{f.name}:` in --config)")
    values.update(fixed or {})
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {prefix}{exc}") from exc


def _check_keys(values: dict, allowed: dict[str, Any], source: str, path: str = "") -> None:
    """Unknown YAML keys are errors; `allowed` is `_yaml_keys` of the configs the file may hold."""
    unknown = sorted(f"{path}{k}" for k in values if k not in allowed)
    if unknown:
        raise SystemExit(f"error: {source}: unknown option(s) {unknown}; run with --help to see the valid ones")
    for key, val in values.items():
        if allowed[key] is not None and isinstance(val, dict):
            cls, skip = allowed[key]
            _check_keys(val, _yaml_keys(cls, skip), source, f"{path}{key}.")


def save_resolved_config(out_dir: str | os.PathLike, configs: dict[str, Any], name: str = "config.yaml") -> Path:
    """Save the resolved configs (dataclasses, nested ones as nested mappings, or dicts) beside an output, as YAML."""
    payload = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in configs.items()}
    path = Path(out_dir) / name
    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(payload, default=str)), sort_keys=False))
    return path


class Command:
    """A subcommand over config dataclasses: flags, `--config FILE.yaml`, resolution, the collision check.

    Args:
        name / help / doc: the subcommand's name, one-line help and description.
        sections: its configs, resolved in this order.
        yaml_also: dataclasses whose fields the YAML file may also hold (a file shared with a sibling command);
            this command ignores them.
        aliases: old flag / top-level YAML name -> the dotted name it now stands for (`max_steps` ->
            `train.max_steps`), so existing scripts and files keep working.
    """

    def __init__(self, name, help, doc, sections, yaml_also=(), aliases=None):
        self.name, self.help, self.doc = name, help, doc
        self.sections: list[Section] = list(sections)
        self.yaml_also = tuple(yaml_also)
        self.aliases: dict[str, str] = dict(aliases or {})
        self.check_collisions()

    def exposed(self) -> dict[str, list[str]]:
        """Exposed (flag / YAML) top-level name -> the sections that hold it."""
        owners: dict[str, list[str]] = {}
        for s in self.sections:
            for f in exposed_fields(s.cls, s.set_by_command):
                owners.setdefault(f.name, []).append(s.name)
        return owners

    def check_collisions(self) -> None:
        clashes = {n: o for n, o in self.exposed().items() if len(o) > 1}
        if clashes:
            raise ValueError(
                f"alignguard {self.name}: field(s) exposed by several configs {clashes}; one flag would feed "
                "them all. Rename one, or list it in the other's Section.set_by_command and derive it there."
            )

    def add_parser(self, subparsers, main) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(
            self.name.split()[-1],
            help=self.help,
            description=self.doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,  # `compare --method lora` must not be read as `--methods lora`
        )
        parser.add_argument("--config", help="YAML file of options (flags given here win).")
        for s in self.sections:
            add_dataclass_args(parser, s.cls, exclude=s.set_by_command)
        for old, new in self.aliases.items():
            add_flag_alias(parser, old, new)
        add_dash_aliases(parser)  # every flag, old names included: one rule, both spellings
        parser.set_defaults(func=user_errors_exit(main), _command=self)
        return parser

    def read_config_file(self, args) -> tuple[dict, str]:
        """The `--config` YAML of `args` (old keys moved to their nested place), checked: unknown or misplaced keys
        are errors. Returns (values, the source named in errors)."""
        path = getattr(args, "config", None)
        values = load_yaml(path) if path else {}
        source = f"--config {path}"
        for old, new in self.aliases.items():  # old top-level keys -> their nested place
            if old in values:
                head, _, tail = new.partition(".")
                nested = values.setdefault(head, {})
                if not isinstance(nested, dict) or tail in nested:
                    raise SystemExit(f"error: {source}: give {old} or {new}, not both")
                nested[tail] = values.pop(old)
        allowed: dict[str, Any] = {}
        for cls in list(self.yaml_also):
            allowed.update(_yaml_keys(cls))
        for s in self.sections:
            allowed.update(_yaml_keys(s.cls, s.set_by_command))
        fixed = {n for s in self.sections for n in s.set_by_command} - set(self.exposed())
        misplaced = sorted(fixed & set(values))
        if misplaced:
            raise SystemExit(f"error: {source}: {misplaced}: set by `alignguard {self.name}` itself; remove them")
        _check_keys(values, allowed, source)
        return values, source

    def resolve(self, args: argparse.Namespace) -> dict[str, Any]:
        """{section name: config}, each built from defaults < `--config` YAML < explicit flags."""
        values, source = self.read_config_file(args)
        done: dict[str, Any] = {}
        for s in self.sections:
            own = {k: v for k, v in values.items() if k not in s.set_by_command}
            flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in s.set_by_command})
            fixed = s.derive(done) if s.derive else {}
            done[s.name] = build_dataclass(s.cls, own, flags, source=source, fixed=fixed)
        return done


def user_errors_exit(main: Callable) -> Callable:
    """Wrap a command's main so bad input found by a recipe (a file, a field, a model folder) ends in one
    `error:` line naming it, as bad flags do; anything else is a bug and keeps its traceback."""
    import functools

    @functools.wraps(main)
    def wrapped(args):
        try:
            return main(args)
        except Exception as exc:
            if not _is_user_error(exc) or os.environ.get("ALIGNGUARD_TRACEBACK"):
                raise
            raise SystemExit(f"error: {exc}\n(set ALIGNGUARD_TRACEBACK=1 to see where it was raised)") from exc

    return wrapped


def _is_user_error(exc: BaseException) -> bool:
    from ..model_folder import ModelLoadError
    from ..tasks import TaskDataError
    from ..trainer import NonFiniteLossError

    return isinstance(exc, (ValueError, FileNotFoundError, ModelLoadError, TaskDataError, NonFiniteLossError))
