"""`alignguard train`: a LoRA adapter on the task data, plain or with the AlignGuard loss.

    alignguard train --model smollm2-135m-instruct --fisher runs/fisher --out runs/ag --lambda_a 100
    alignguard train --method lora --poison_ratio 0.2 --out runs/lora

Re-running the same command after an interruption resumes from the last checkpoint in <out>/checkpoints.
"""

from __future__ import annotations

import argparse

from ..config import AlignGuardConfig
from ..stages import TrainRunConfig, run_train
from .common import add_dataclass_args, build_dataclass, check_unknown_keys, load_yaml, save_resolved_config

CONFIGS = (TrainRunConfig, AlignGuardConfig)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "train",
        help="Train a LoRA adapter (plain or AlignGuard).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of options (flags given here win).")
    for cls in CONFIGS:
        add_dataclass_args(parser, cls)
    parser.set_defaults(func=main)
    return parser


def resolve(args):
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    check_unknown_keys(values, list(CONFIGS), args.config or "")
    return tuple(build_dataclass(cls, values, args) for cls in CONFIGS)


def main(args) -> int:
    run_cfg, ag_cfg = resolve(args)
    save_resolved_config(run_cfg.out, {"run": run_cfg, "alignguard": ag_cfg})
    summary = run_train(run_cfg, ag_cfg)
    print(
        f"{run_cfg.method}: {summary['steps']} steps, train loss {summary['train_loss']:.4f}, "
        f"adapter in {summary['adapter']}"
    )
    return 0
