"""`alignguard capsule train|eval`: R-Capsule from the command line.

    alignguard capsule train --config configs/capsule/smollm2.yaml --out runs/capsule   # + the lambda=0 control
    alignguard capsule eval --config configs/capsule/smollm2.yaml --checkpoint runs/capsule --out runs/capsule/eval

    alignguard capsule train --config configs/capsule/tiny.yaml --recon_lambda 0 --init_from runs/capsule \\
        --out runs/capsule-l0                     # the same control by hand (what --lambda0_control does)
    alignguard capsule eval --checkpoint runs/capsule --compare_checkpoints runs/capsule-l0 --out runs/capsule/eval

Flags win over `--config FILE.yaml`; one YAML may hold model, data, train and eval fields (each command takes the
ones it needs). Re-running the same `train` command resumes from the last checkpoint in `--out`; re-running it
with a larger `--capsule_steps` extends a finished run (the result equals a fresh run of that length).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import yaml

from alignguard.cli.common import (
    Command,
    Section,
    atomic_write_text,
    build_dataclass,  # noqa: F401  (re-exported: tests build single configs with it)
    save_resolved_config,
)

from .config import CONTROL_DIR, CapsuleDataConfig, CapsuleEvalConfig, CapsuleModelConfig, CapsuleTrainConfig

ALL_CONFIGS = [CapsuleModelConfig, CapsuleDataConfig, CapsuleTrainConfig, CapsuleEvalConfig]
TRAIN_GROUPS = {"model": CapsuleModelConfig, "data": CapsuleDataConfig, "train": CapsuleTrainConfig}
# Changing these between the interrupted and the resumed run does not change the result, so they may differ.
_RESUME_FREE = {"show_progress_bar", "logging_steps", "save_steps", "save_total_limit", "device", "lambda0_control"}
# These may grow on resume, which extends a finished run: after warmup the learning rate is constant and every step
# reseeds its batch and dropout from (seed, step), so the first steps of a longer run are exactly the shorter run's
# (tested). Shrinking one is refused: the checkpoints already hold the later steps.
_RESUME_GROWABLE = {"capsule_steps"}


@dataclasses.dataclass
class CapsuleTrainRun:
    """Where `alignguard capsule train` writes, and where its stage 1 may come from."""

    out: str = dataclasses.field(metadata={"help": "Output folder (checkpoints, final weights, config.yaml)."})
    init_from: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Start stage 2 from the end-of-stage-1 checkpoint of this earlier run (same model, data and "
            "stage 1), e.g. to train the --recon_lambda 0 control without repeating stage 1."
        },
    )


@dataclasses.dataclass
class CapsuleEvalRun:
    """Which run `alignguard capsule eval` evaluates and where the results go."""

    checkpoint: str = dataclasses.field(metadata={"help": "An `alignguard capsule train --out` folder."})
    out: str = dataclasses.field(metadata={"help": "Folder for results.json, results.md and the plot."})


# One YAML may hold model, data, train and eval fields; each command reads the ones it needs.
TRAIN_COMMAND = Command(
    "capsule train",
    "Staged R-Capsule training (full CoT, then capsule + reconstruction).",
    __doc__,
    [Section("run", CapsuleTrainRun), *(Section(name, cls) for name, cls in TRAIN_GROUPS.items())],
    yaml_also=(CapsuleEvalConfig,),
)
EVAL_COMMAND = Command(
    "capsule eval",
    "Accuracy / tokens / latency / plan fidelity of a capsule run and controls.",
    __doc__,
    [Section("run", CapsuleEvalRun), Section("eval", CapsuleEvalConfig)],
    yaml_also=tuple(TRAIN_GROUPS.values()),
)


def _file_values(args: argparse.Namespace) -> dict:
    """The `--config` YAML of `args`, checked (unknown keys, misplaced ones) by its command."""
    return args._command.read_config_file(args)[0]


def add_train_parser(sub) -> argparse.ArgumentParser:
    return TRAIN_COMMAND.add_parser(sub, run_train)


def add_eval_parser(sub) -> argparse.ArgumentParser:
    return EVAL_COMMAND.add_parser(sub, run_eval)


def _check_resume_compatible(out: Path, configs: dict) -> None:
    old_file = out / "config.yaml"
    if not old_file.is_file():
        return
    old = yaml.safe_load(old_file.read_text()) or {}
    new = json.loads(json.dumps({k: dataclasses.asdict(v) for k, v in configs.items()}, default=str))
    # A field added after the run was written (absent from its config.yaml) counts as its default there.
    defaults = {
        group: {f.name: f.default for f in dataclasses.fields(type(c)) if f.default is not dataclasses.MISSING}
        for group, c in configs.items()
    }

    def old_value(group, key):
        return old.get(group, {}).get(key, defaults[group].get(key))

    def compatible(group, key, val):
        old_val = old_value(group, key)
        return (
            key in _RESUME_FREE
            or old_val == val
            or (key in _RESUME_GROWABLE and old_val is not None and val > old_val)
        )

    diffs = [
        f"{group}.{key}: {old_value(group, key)!r} -> {val!r}"
        for group, fields in new.items()
        for key, val in fields.items()
        if not compatible(group, key, val)
    ]
    if diffs:
        raise SystemExit(
            f"error: --out {out} holds a run with a different config ({'; '.join(diffs)}); "
            "use a new --out or the same options to resume (a larger --capsule_steps extends the run)"
        )


# Stage 1 depends on these train fields only (besides model and data), so a run may share another run's stage 1.
_STAGE1_FIELDS = (
    "cot_steps",
    "batch_size",
    "learning_rate",
    "capsule_learning_rate",
    "weight_decay",
    "warmup_steps",
    "max_grad_norm",
    "max_length",
    "seed",
)


def _init_from(src: Path, out: Path, configs: dict) -> None:
    """Copy `src`'s end-of-stage-1 checkpoint and stage-1 weights into a fresh `out`, after checking compatibility."""
    from .train import CHECKPOINTS_DIR, STAGE1_DIR, latest_checkpoint, stage1_checkpoint_name

    if latest_checkpoint(out) is not None:
        return  # already initialised (or further): plain resume
    src_cfg = src / "config.yaml"
    if not src_cfg.is_file():
        raise SystemExit(f"error: --init_from {src}: no config.yaml (is it an `alignguard capsule train` --out?)")
    old = yaml.safe_load(src_cfg.read_text()) or {}
    new = json.loads(json.dumps({k: dataclasses.asdict(v) for k, v in configs.items()}, default=str))
    diffs = [f"{g}.{k}" for g in ("model", "data") for k in new[g] if k != "device" and old[g].get(k) != new[g][k]]
    diffs += [f"train.{k}" for k in _STAGE1_FIELDS if old["train"].get(k) != new["train"][k]]
    if diffs:
        raise SystemExit(f"error: --init_from {src}: stage 1 differs from this run ({', '.join(diffs)})")
    name = stage1_checkpoint_name(configs["train"])
    ckpt = src / CHECKPOINTS_DIR / name
    if not ckpt.is_dir():
        raise SystemExit(f"error: --init_from {src}: no {CHECKPOINTS_DIR}/{name} (stage 1 not finished there?)")
    shutil.copytree(ckpt, out / CHECKPOINTS_DIR / name)
    shutil.copytree(src / STAGE1_DIR, out / STAGE1_DIR, dirs_exist_ok=True)
    print(f"initialised {out} from {ckpt}")


def _train_one(configs: dict, out: Path, train_examples: list, init_from: Path | None = None) -> dict:
    """Train (or resume) one run into `out`: config check, optional stage-1 start, weights, train_results.json."""
    from .model import build_capsule_model
    from .train import train_capsule

    _check_resume_compatible(out, configs)
    if init_from is not None:
        _init_from(init_from, out, configs)
    save_resolved_config(out, configs)
    model, tokenizer = build_capsule_model(configs["model"], configs["train"].seed)
    result = train_capsule(model, tokenizer, train_examples, configs["train"], out)
    atomic_write_text(out / "train_results.json", json.dumps(result, indent=2))
    last = result["history"][-1] if result["history"] else {}
    print(f"done: {len(result['history'])} steps, last {last}, weights in {out}")
    return result


def run_train(args: argparse.Namespace) -> int:
    from .data import load_splits

    resolved = TRAIN_COMMAND.resolve(args)
    run = resolved.pop("run")
    configs = resolved  # model, data, train: what config.yaml records and a resume compares
    out = Path(run.out)
    _check_resume_compatible(out, configs)
    print(yaml.safe_dump({k: dataclasses.asdict(v) for k, v in configs.items()}, sort_keys=False), end="")
    splits = load_splits(configs["data"])
    print(f"data: {len(splits['train'])} training problems ({configs['data'].data_source})")
    _train_one(configs, out, splits["train"], Path(run.init_from) if run.init_from else None)
    if configs["train"].lambda0_control and configs["train"].recon_lambda > 0:
        # The control is this run with lambda = 0 from the same end-of-stage-1 checkpoint: one command trains
        # both, and re-running it resumes whichever is unfinished.
        control = {**configs, "train": dataclasses.replace(configs["train"], recon_lambda=0.0, lambda0_control=False)}
        print(f"lambda = 0 control: stage 2 again with recon_lambda 0 into {out / CONTROL_DIR}")
        _train_one(control, out / CONTROL_DIR, splits["train"], init_from=out)
    return 0


def _check_finished(checkpoint: Path) -> None:
    """Refuse to evaluate a run whose training is unfinished: an interrupted extension (a larger --capsule_steps)
    leaves the shorter run's final weights in the folder, which would be evaluated under the longer run's name."""
    from .train import latest_checkpoint

    cfg_file, ckpt = checkpoint / "config.yaml", latest_checkpoint(checkpoint)
    if not cfg_file.is_file() or ckpt is None:
        return  # not a `capsule train` folder with checkpoints (plain weights): nothing to compare against
    train = (yaml.safe_load(cfg_file.read_text()) or {}).get("train", {})
    total = int(train.get("cot_steps", 0)) + int(train.get("capsule_steps", 0))
    step = int(ckpt.name.split("-")[1])
    if step < total:
        raise SystemExit(
            f"error: --checkpoint {checkpoint}: training is unfinished (step {step} of {total} in its config.yaml); "
            "re-run the same `alignguard capsule train` command to finish it, then evaluate"
        )


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import format_table, run_capsule_eval, write_eval_outputs

    resolved = EVAL_COMMAND.resolve(args)
    run, cfg = resolved["run"], resolved["eval"]
    _check_finished(Path(run.checkpoint))
    try:
        # Finished rows are kept in OUT/rows so an interrupted evaluation resumes (same command again).
        result = run_capsule_eval(run.checkpoint, cfg, rows_dir=Path(run.out) / "rows")
    except (FileNotFoundError, ValueError) as exc:  # a missing folder or package; an unknown --systems name
        raise SystemExit(f"error: {exc}") from exc
    save_resolved_config(run.out, {"eval": cfg, "checkpoint": str(run.checkpoint)}, name="eval_config.yaml")
    paths = write_eval_outputs(result, run.out)
    print(format_table(result["rows"]))
    print(f"results: {paths['json']}  plot: {paths['plot']}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `capsule` with its `train` and `eval` subcommands on an argparse subparsers object."""
    p = subparsers.add_parser(
        "capsule",
        help="R-Capsule: compact latent plans (train | eval).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="capsule_command", metavar="{train,eval}")
    add_train_parser(sub)
    add_eval_parser(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])
    return p


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m alignguard.capsule.cli train|eval ...`."""
    parser = argparse.ArgumentParser(prog="alignguard")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["capsule", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
