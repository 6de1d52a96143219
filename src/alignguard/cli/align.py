"""`alignguard align`: LoRA SFT on refusals + self-distilled helpful answers, then DPO, merged and saved as an
HF model; reports base vs aligned refusal / over-refusal (look-alikes separately) on a DriftCheck split.

alignguard align --config configs/smollm2/align.yaml                         # the preset (docs/alignment.md)
alignguard align --model smollm2-135m-instruct --out runs/aligned --dpo_steps 0 --eval_prompts small
"""

from __future__ import annotations

from ..recipes.align import AlignRunConfig, run_align
from ..recipes.common import check_output_dir
from .common import Command, Section, save_resolved_config

COMMAND = Command("align", "Align a base model (LoRA SFT + DPO, merged).", __doc__, [Section("align", AlignRunConfig)])


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
    report = out / "align_report.json"
    print(f"aligned model written to {out}" + (f"; report: {report}" if report.is_file() else ""))
    return 0
