"""`alignguard align`: LoRA SFT on refusals + self-distilled helpful answers, then DPO, merged and saved as an
HF model; reports base vs aligned refusal / over-refusal (look-alikes separately) on a DriftCheck split.

alignguard align --config configs/smollm2/align.yaml                         # the preset (docs/alignment.md)
alignguard align --model smollm2-135m-instruct --out runs/aligned --dpo_steps 0 --eval_prompts small
"""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_json
from ..recipes.align import AlignRunConfig, aligned_with_settings, run_align
from ..recipes.common import RUN_FILE, check_output_dir, plain_settings
from .common import Command, Section, save_resolved_config

COMMAND = Command("align", "Align a base model (LoRA SFT + DPO, merged).", __doc__, [Section("align", AlignRunConfig)])


def add_parser(subparsers):
    return COMMAND.add_parser(subparsers, main)


def resolve(args):
    """(AlignRunConfig,): defaults < YAML < flags."""
    return tuple(COMMAND.resolve(args).values())


def main(args) -> int:
    (cfg,) = resolve(args)
    out = Path(cfg.out)
    if not cfg.overwrite and not (out / RUN_FILE).is_file() and aligned_with_settings(out, cfg):
        # A model aligned with exactly these settings, but not by this command (the demo's cache of aligned
        # models): adopt it as this command's run, so `align --out <that folder>` skips the training and reports
        # on it instead of refusing the folder. Nothing in it is changed but the run record.
        print(f"[align] {out}: holds a model aligned with these settings (no {RUN_FILE}); adopted as this run")
        atomic_write_json(out / RUN_FILE, {"command": "align", "settings": plain_settings({"align": cfg})})
    check_output_dir(cfg.out, "align", {"align": cfg}, cfg.overwrite, config_name="align_config.yaml")
    save_resolved_config(cfg.out, {"align": cfg}, name="align_config.yaml")
    out = run_align(cfg)
    report = out / "align_report.json"
    print(f"aligned model written to {out}" + (f"; report: {report}" if report.is_file() else ""))
    return 0
