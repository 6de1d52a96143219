"""`alignguard` command line.

    alignguard demo    --out runs/demo                           # everything on the bundled default
    alignguard models                                           # offline models on this machine
    alignguard align   --model NAME --out DIR                   # LoRA SFT on refusals, merged (aligned model)
    alignguard fisher  --model PATH --out DIR                   # Fisher factors + alignment subspaces
    alignguard train   --model PATH --fisher DIR --out DIR      # LoRA adapter with the AlignGuard loss
    alignguard eval    --model PATH --prompts FILE --out DIR    # DriftCheck
    alignguard compare --model PATH --out DIR                   # all methods, one table
    alignguard calibrate --model PATH --out DIR --drift_budget 10   # lambda for a drift budget, then train
    alignguard scaling --model PATH --out DIR                   # forgetting scaling law
    alignguard report  RUN_DIR                                  # report.md / report.html
    alignguard capsule train|eval                               # R-Capsule

Each subcommand takes `--config FILE.yaml`; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand name -> module under alignguard.cli exposing add_parser(subparsers).
COMMANDS = {
    "fisher": "alignguard.cli.fisher",
    "train": "alignguard.cli.train",
    "align": "alignguard.cli.align",
    "compare": "alignguard.cli.compare",
    "calibrate": "alignguard.cli.calibrate",
    "scaling": "alignguard.cli.scaling",
    "demo": "alignguard.cli.demo",
    "capsule": "alignguard.cli.capsule",
    "eval": "alignguard.cli.eval",
    "report": "alignguard.cli.report",
    "models": "alignguard.cli.models",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignguard",
        description="Fine-tune Hugging Face causal LMs with LoRA without losing their safety alignment.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
