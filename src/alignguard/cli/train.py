"""`alignguard train`: a LoRA adapter on the task data, plain or with the AlignGuard loss.

    alignguard train --model smollm2-135m-instruct --fisher runs/fisher --out runs/ag --lambda_a 100
    alignguard train --method lora --poison_ratio 0.2 --out runs/lora

Re-running the same command after an interruption resumes from the last checkpoint in <out>/checkpoints.
"""

from __future__ import annotations

from ..config import AlignGuardConfig
from ..recipes.common import check_output_dir
from ..recipes.train import TrainRunConfig, run_train
from .common import Command, Section, save_resolved_config

COMMAND = Command(
    "train",
    "Train a LoRA adapter (plain or AlignGuard).",
    __doc__,
    [Section("run", TrainRunConfig), Section("alignguard", AlignGuardConfig)],
)


def add_parser(subparsers):
    return COMMAND.add_parser(subparsers, main)


def resolve(args):
    """(TrainRunConfig, AlignGuardConfig): defaults < YAML < flags."""
    return tuple(COMMAND.resolve(args).values())


def main(args) -> int:
    run_cfg, ag_cfg = resolve(args)
    check_output_dir(run_cfg.out, "train", {"run": run_cfg, "alignguard": ag_cfg}, run_cfg.overwrite)
    save_resolved_config(run_cfg.out, {"run": run_cfg, "alignguard": ag_cfg})
    summary = run_train(run_cfg, ag_cfg)
    print(
        f"{run_cfg.method}: {summary['steps']} steps, train loss {summary['train_loss']:.4f}, "
        f"adapter in {summary['adapter']}"
    )
    return 0
