"""Pipeline helpers the recipes share: LoRA construction, checkpointed TrainingArguments, resume lookup, the
output-folder guard of the CLI mains and the settings keys of resumable stages."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path

from ..io import atomic_write_json

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def add_lora(model, r: int, alpha: float, targets: list[str], dropout: float = 0.0, use_rslora: bool = False):
    """`get_peft_model` with a causal-LM `LoraConfig` (the training and alignment stages share it).

    Raises:
        ValueError: no module of the model matches `targets` (the message lists module names the model has).
    """
    from peft import LoraConfig, get_peft_model

    # peft's own error names only the targets; name what the model has, so the fix is one flag away.
    names = [n for n, _ in model.named_modules()]
    if not isinstance(targets, str) and not any(n == t or n.endswith("." + t) for n in names for t in targets):
        have = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
            - {"lm_head"}
        )
        family = getattr(getattr(model, "config", None), "model_type", "this")
        raise ValueError(
            f"target_modules {list(targets)}: no module of the {family} model matches; its linear layers are named "
            f"{', '.join(have[:8])}{', ...' if len(have) > 8 else ''}; pass some of these as --target-modules"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def checkpointed_training_args(
    output_dir, max_steps, batch_size, learning_rate, seed, save_steps, progress=True, **extra
):
    """`TrainingArguments` for our LoRA runs: seeded data order, a checkpoint every `save_steps` (only the last is
    kept), no external loggers, CPU when there is no CUDA device."""
    import torch
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        data_seed=seed,
        logging_steps=max(1, min(10, max_steps // 5)),
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,
        report_to="none",
        warmup_steps=0,
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


# What a `Trainer` checkpoint must hold to be resumed from. The Trainer writes trainer_state.json last, so a
# folder without it (or with a truncated one) is a save that was killed half-way. The optimizer state is
# optimizer.pt, or a folder under DeepSpeed (global_step*) or FSDP (optimizer_*).
CHECKPOINT_FILES = ("trainer_state.json", "scheduler.pt")
OPTIMIZER_STATES = ("optimizer.pt", "global_step*", "optimizer_*")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model_fsdp*")


def _non_empty(path: Path) -> bool:
    return path.is_dir() or (path.is_file() and path.stat().st_size > 0)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (a missing or unreadable file), or None when it is complete."""
    for name in CHECKPOINT_FILES:
        if not (ckpt / name).is_file() or (ckpt / name).stat().st_size == 0:
            return f"no {name}"
    if not any(_non_empty(p) for pattern in OPTIMIZER_STATES for p in ckpt.glob(pattern)):
        return "no optimizer state"
    if not any(_non_empty(p) for pattern in ADAPTER_WEIGHTS for p in ckpt.glob(pattern)):
        return "no adapter weights"
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    if state.get("global_step") != _step_of(ckpt):
        return f"trainer_state.json is for step {state.get('global_step')}"
    return None


def _step_of(path: Path) -> int | None:
    tail = path.name.split("-")[-1]
    return int(tail) if tail.isdigit() else None


def latest_checkpoint(directory: Path, log=print) -> Path | None:
    """The newest complete `checkpoint-N` folder under `directory` (what a re-run resumes from), or None.

    Incomplete ones (a save killed half-way, see `checkpoint_problem`) newer than it are renamed to
    `incomplete-checkpoint-N` (kept, out of the Trainer's sight): the Trainer would otherwise rotate the good
    checkpoint away in favour of the broken one at its next save.
    """
    ckpts = sorted(
        (p for p in Path(directory).glob("checkpoint-*") if p.is_dir() and _step_of(p) is not None), key=_step_of
    )
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        aside = ckpt.with_name(f"incomplete-{ckpt.name}")
        n = 1
        while aside.exists():
            n += 1
            aside = ckpt.with_name(f"incomplete-{ckpt.name}-{n}")
        ckpt.rename(aside)
        if log:
            log(f"skipping incomplete checkpoint {ckpt} ({problem}); moved to {aside.name}")
    return None


def restore_final_checkpoint(trainer, peft_model, ckpt: Path) -> None:
    """Load the adapter weights and trainer state of a checkpoint at the last step, without a training step: a
    run killed after its last checkpoint resumes to nothing (the Trainer would train one step too many)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    weights = ckpt / "adapter_model.safetensors"
    if weights.is_file():
        state_dict = load_file(str(weights))
    else:
        import torch

        state_dict = torch.load(ckpt / "adapter_model.bin", map_location="cpu", weights_only=True)
    set_peft_model_state_dict(peft_model, state_dict)
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))


# --- Settings of a run or stage -------------------------------------------------------------------------------

# Fields that change no output: left out of every comparison of settings.
IGNORED_FIELDS = frozenset({"out", "overwrite", "show_progress"})


def plain_settings(configs: dict) -> dict:
    """`configs` (dataclasses, dicts, values) as JSON-plain data without `IGNORED_FIELDS`."""
    payload = {k: (asdict(v) if is_dataclass(v) else v) for k, v in configs.items()}
    payload = json.loads(json.dumps(payload, default=str))

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in IGNORED_FIELDS}
        return value

    return strip(payload)


def settings_key(settings: dict) -> str:
    """A short hash of `settings` (key order does not matter)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_diff(old: dict, new: dict, limit: int = 8) -> list[str]:
    """`field: old -> new` for every differing leaf (dotted names), at most `limit` of them. A section only one
    side has is one entry."""
    unset = "(unset)"

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                yield from walk(a.get(k, unset), b.get(k, unset), f"{prefix}{k}.")
        elif a != b:
            shown = [("{...}" if isinstance(v, dict) else repr(v)) if v is not unset else repr(unset) for v in (a, b)]
            yield f"{prefix[:-1]}: {shown[0]} -> {shown[1]}"

    diffs = list(walk(old or {}, new or {}, ""))
    return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


def file_digest(path: str | os.PathLike | None) -> str | None:
    """sha256 (16 hex digits) of a file's bytes, None for None; a folder hashes its file names and sizes."""
    if path is None:
        return None
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p)}:{f.stat().st_size}\n".encode())
    elif p.is_file():
        h.update(p.read_bytes())
    else:
        return "missing"
    return h.hexdigest()[:16]


# --- Resumable stages (compare, scaling) -----------------------------------------------------------------------

STAGE_KEY_FILE = "stage_key.json"
SUPERSEDED_DIR = "superseded"


def stage_is_current(
    directory: Path, settings: dict, done, root: Path, label: str, log=print, earlier_forms: tuple = ()
) -> bool:
    """Whether the finished stage in `directory` was made with `settings` (then it is reused); `done` is the file
    whose presence marks the stage finished, or a bool. `earlier_forms`: the same settings as an earlier release
    keyed them; a stage keyed so is the same stage, and its key file is rewritten rather than the stage redone.

    A stage made with other settings (or before stages were keyed) is moved to `<root>/superseded/` rather than
    deleted, and `settings` are recorded for the stage about to be redone; an unfinished stage with the same
    settings is kept (its checkpoints are resumed). `log` gets one line saying what happened and why.
    """
    directory = Path(directory)
    key_file = directory / STAGE_KEY_FILE
    key = settings_key(settings)
    record = {"key": key, "settings": settings}
    if directory.is_dir() and any(directory.iterdir()):
        old = _read_json(key_file)
        if old is None and legacy_outputs_match(directory):
            atomic_write_json(key_file, record)
            if done if isinstance(done, bool) else Path(done).is_file():
                log(
                    f"[{label}] reused: made before stages were keyed, by a run with these same settings ({directory})"
                )
                return True
            log(f"[{label}] resuming: made before stages were keyed, by a run with these same settings ({directory})")
            return False
        if old is not None and old.get("key") != key and old.get("key") in {settings_key(f) for f in earlier_forms}:
            atomic_write_json(key_file, record)
            old = record
        if old is not None and old.get("key") == key:
            if done if isinstance(done, bool) else Path(done).is_file():
                log(f"[{label}] reused: finished with the same settings ({directory})")
                return True
            log(f"[{label}] resuming: unfinished, same settings ({directory})")
            return False
        why = (
            "settings changed: " + "; ".join(settings_diff(old.get("settings", {}), settings))
            if old is not None
            else f"no {STAGE_KEY_FILE} (made before stages were keyed), so its settings are unknown"
        )
        moved = supersede(directory, root, (old or {}).get("key", "unkeyed"))
        log(f"[{label}] redone: {why}; the old outputs moved to {moved}")
    else:
        log(f"[{label}] new")
    atomic_write_json(key_file, record)
    return False


def legacy_outputs_match(path: str | os.PathLike) -> bool:
    """Whether outputs under `path` without a settings key were made by a run with the current settings: the
    nearest `run.json` above says so when the guard found the folder's older config file identical to this run's
    (see `check_output_dir`). Such outputs are adopted instead of redone."""
    for folder in (Path(path), *Path(path).parents):
        run = _read_json(folder / RUN_FILE)
        if run is not None:
            return bool(run.get(LEGACY_MATCH))
    return False


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def supersede(directory: Path, root: Path, key: str | None = None) -> Path:
    """Move a stage folder to `<root>/superseded/<its path>-<key>` (kept, not deleted); returns the new path."""
    key = key or (_read_json(Path(directory) / STAGE_KEY_FILE) or {}).get("key", "unkeyed")
    rel = directory.resolve().relative_to(Path(root).resolve())
    target = Path(root) / SUPERSEDED_DIR / f"{'_'.join(rel.parts)}-{key}"
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{'_'.join(rel.parts)}-{key}-{n}")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(directory, target)
    return target


# --- The output-folder guard of the CLI mains ------------------------------------------------------------------

RUN_FILE = "run.json"
# run.json field: the folder holds outputs of a run from before settings keys whose config file equals this run's.
LEGACY_MATCH = "legacy_settings_match"
# Commands whose stages are keyed by their own settings (`stage_is_current`): a re-run with other settings reuses
# what matches and redoes the rest, so only the command has to match.
STAGE_KEYED_COMMANDS = frozenset({"compare", "scaling", "demo", "calibrate"})


def check_output_dir(
    out: str | os.PathLike, command: str, configs: dict, overwrite: bool = False, config_name: str = "config.yaml"
) -> Path:
    """Refuse an --out the command cannot write into safely; call before writing anything there.

    `out` must be writable (checked by creating a file there). A non-empty `out` must hold a run of the same
    command (recorded in `<out>/run.json`, or recognised by an identical `config_name` of an older run) with the
    same `configs` (fields in `IGNORED_FIELDS` aside); for compare, scaling and demo, whose stages are keyed by
    their own settings, the same command suffices. Otherwise the run stops with an error naming the folder,
    what is there and the fix, unless `overwrite`: then the folder's previous contents are deleted first.
    Records `<out>/run.json` ({"command", "settings"}, plus `legacy_settings_match: true` when the folder is a
    run from before run.json whose config file equals this run's: its unkeyed stages are then adopted, see
    `legacy_outputs_match`).

    Raises:
        SystemExit: with the message, for the CLI.
    """
    out = Path(out)
    _check_writable(out)
    settings = plain_settings(configs)
    entries = sorted(p.name for p in out.iterdir())
    legacy_match = False
    if entries:
        defaults = plain_settings({k: field_defaults(v) for k, v in configs.items() if is_dataclass(v)})
        problem, legacy_match = _mismatch(out, command, settings, entries, config_name, defaults)
        if overwrite:
            _clear(out)
            legacy_match = False
            print(f"[{command}] --overwrite true: deleted the previous contents of {out}")
        elif problem:
            raise SystemExit(
                f"error: --out {out}: {problem}. Nothing was changed; choose another --out, or pass "
                "--overwrite true to delete its contents and start afresh"
            )
    record = {"command": command, "settings": settings}
    if legacy_match:
        record[LEGACY_MATCH] = True
    atomic_write_json(out / RUN_FILE, record)
    return out


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = "it is a file" if out.is_file() else (exc.strerror or str(exc))
        raise SystemExit(
            f"error: --out {out}: cannot write there ({reason}); choose another --out or make it writable"
        ) from exc


def field_defaults(config) -> dict:
    """The default of every field of a config dataclass that has one (nested config defaults as dicts)."""
    values = {}
    for f in fields(config):
        if f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
        else:
            continue
        if is_dataclass(values[f.name]):
            values[f.name] = asdict(values[f.name])
    return values


def with_added_defaults(old, defaults):
    """`old` settings with every field they lack filled in from `defaults`: a run recorded before a field was
    added behaved as its default does (new options default to the old behaviour), so it is not a change."""
    if not (isinstance(old, dict) and isinstance(defaults, dict)):
        return old
    filled = dict(old)
    for k, v in defaults.items():
        filled[k] = with_added_defaults(old[k], v) if k in old else v
    return filled


def _mismatch(out: Path, command: str, settings: dict, entries: list[str], config_name: str, defaults=None):
    """(why `out` cannot be written into or None, whether its unkeyed outputs were made with these settings).
    Fields the recorded run lacks count as their `defaults` (`with_added_defaults`)."""
    run = _read_json(out / RUN_FILE)
    legacy = bool(run and run.get(LEGACY_MATCH))
    if run is None:
        # Runs from before run.json: recognised by a config file with the same sections (= the same command).
        import yaml

        try:
            old = yaml.safe_load((out / config_name).read_text()) if (out / config_name).is_file() else None
        except yaml.YAMLError:
            old = None
        if isinstance(old, dict) and set(old) == set(settings):
            run, legacy = {"command": command, "settings": plain_settings(old)}, True
        else:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            return f"is not empty ({shown}) and holds no `alignguard {command}` run ({RUN_FILE} missing)", False
    if run.get("command") != command:
        other = run.get("command")
        return f"holds an `alignguard {other}` run ({out / RUN_FILE}), not an `alignguard {command}` one", False
    diff = settings_diff(with_added_defaults(run.get("settings", {}), defaults or {}), settings)
    if diff and command not in STAGE_KEYED_COMMANDS:
        why = f"holds an `alignguard {command}` run with other settings ({'; '.join(diff)}), so it cannot be resumed"
        return why, False
    return None, legacy and not diff


def _clear(out: Path) -> None:
    resolved = out.resolve()
    # Folders whose loss would hurt more than a rerun: the working folder or any folder above it, home, a checkout.
    protected = Path.cwd().resolve().is_relative_to(resolved) or Path.home().resolve().is_relative_to(resolved)
    if protected or (out / ".git").exists():
        raise SystemExit(
            f"error: --out {out}: --overwrite refuses to empty the working folder or a folder above it, the home "
            "folder, the root or a git checkout; choose a dedicated --out"
        )
    for item in out.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()
