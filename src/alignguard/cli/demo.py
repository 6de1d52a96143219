"""`alignguard demo`: align (if needed) -> Fisher -> plain LoRA vs AlignGuard -> DriftCheck -> report.

    alignguard demo --out runs/demo
    alignguard demo --out runs/demo-tiny --model tiny-llama --max_steps 2     # a smoke run in seconds

Re-running the same command resumes: finished stages are skipped.
"""

from __future__ import annotations

import argparse

from ..demo import DemoConfig, run_demo
from .common import add_dataclass_args, build_dataclass, check_unknown_keys, load_yaml, save_resolved_config


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="Run the whole pipeline on the bundled default.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of options (flags given here win).")
    add_dataclass_args(parser, DemoConfig)
    parser.set_defaults(func=main)
    return parser


def resolve(args):
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    check_unknown_keys(values, [DemoConfig], args.config or "")
    return (build_dataclass(DemoConfig, values, args),)


def main(args) -> int:
    (cfg,) = resolve(args)
    save_resolved_config(cfg.out, {"demo": cfg}, name="demo_config.yaml")
    result = run_demo(cfg)
    print("\n" + result["table"])
    print(f"demo finished in {result['seconds'] / 60:.1f} min; results: {cfg.out}/results.json")
    if result["report"]:
        print(f"report: {result['report']}")
    return 0
