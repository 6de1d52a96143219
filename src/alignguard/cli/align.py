"""`alignguard align`: LoRA SFT on refusals + self-distilled helpful answers, merged and saved as an HF model.

alignguard align --model smollm2-135m-instruct --out runs/aligned
alignguard eval --model runs/aligned --out runs/aligned-eval      # check refusal / over-refusal
"""

from __future__ import annotations

from ..recipes.align import AlignRunConfig, run_align
from ..recipes.common import check_output_dir
from .common import Command, Section, save_resolved_config

COMMAND = Command("align", "Align a base model (LoRA SFT, merged).", __doc__, [Section("align", AlignRunConfig)])


def add_parser(subparsers):
    return COMMAND.add_parser(subparsers, main)


def resolve(args):
    """(AlignRunConfig,): defaults < YAML < flags."""
    return tuple(COMMAND.resolve(args).values())


def main(args) -> int:
    (cfg,) = resolve(args)
    check_output_dir(cfg.out, "align", {"align": cfg}, cfg.overwrite, config_name="align_config.yaml")
    save_resolved_config(cfg.out, {"align": cfg}, name="align_config.yaml")
    out = run_align(cfg)
    print(f"aligned model written to {out}")
    return 0
