"""`alignguard align`: LoRA SFT on refusals + self-distilled helpful answers, merged and saved as an HF model.

alignguard align --model smollm2-135m-instruct --out runs/aligned
alignguard eval --model runs/aligned --out runs/aligned-eval      # check refusal / over-refusal
"""

from __future__ import annotations

import argparse

from ..align import AlignRunConfig, run_align
from .common import add_dataclass_args, build_dataclass, check_unknown_keys, load_yaml, save_resolved_config


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "align",
        help="Align a base model (LoRA SFT, merged).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of options (flags given here win).")
    add_dataclass_args(parser, AlignRunConfig)
    parser.set_defaults(func=main)
    return parser


def resolve(args):
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    check_unknown_keys(values, [AlignRunConfig], args.config or "")
    return (build_dataclass(AlignRunConfig, values, args),)


def main(args) -> int:
    (cfg,) = resolve(args)
    save_resolved_config(cfg.out, {"align": cfg}, name="align_config.yaml")
    out = run_align(cfg)
    print(f"aligned model written to {out}")
    return 0
