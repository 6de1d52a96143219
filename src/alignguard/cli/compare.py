"""`alignguard compare`: plain LoRA, AlignGuard, its ablations and the baselines on the same data and seeds.

    alignguard compare --model runs/aligned --out runs/compare --poison_ratio 0.2 --max_steps 50
    alignguard compare --config configs/compare/smollm2.yaml --seeds 0 1 2

Methods: plain_lora, alignguard, ag_no_alignment, ag_no_task, ag_no_overlap, ag_no_geodesic, ag_project,
random_subspace, ewc, safe_lora, replay, alignguard_replay. Writes <out>/results.json and <out>/results.md;
re-running the same command resumes (finished methods are skipped).
"""

from __future__ import annotations

import argparse

from ..compare import CompareConfig, run_compare
from ..config import AlignGuardConfig, FisherConfig, SubspaceConfig
from ..stages import TrainRunConfig
from .common import add_dataclass_args, build_dataclass, check_unknown_keys, load_yaml, save_resolved_config

CONFIGS = (CompareConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig)
# Fields of TrainRunConfig that compare sets itself per method.
_SET_BY_COMPARE = {"model", "out", "method", "fisher", "seed"}


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "compare",
        help="Compare methods (table + results.json).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of options (flags given here win).")
    for cls in CONFIGS:
        add_dataclass_args(parser, cls, exclude=_SET_BY_COMPARE if cls is TrainRunConfig else ())
    parser.set_defaults(func=main)
    return parser


def resolve(args):
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    check_unknown_keys(values, list(CONFIGS), args.config or "")
    cmp_cfg = build_dataclass(CompareConfig, values, args)
    train_values = {k: v for k, v in values.items() if k not in _SET_BY_COMPARE}
    for key in _SET_BY_COMPARE:
        if hasattr(args, key) and key not in ("model", "out"):
            delattr(args, key)
    train_cfg = build_dataclass(
        TrainRunConfig, {**train_values, "method": "lora", "model": cmp_cfg.model, "out": cmp_cfg.out}, args
    )
    rest = tuple(build_dataclass(cls, values, args) for cls in CONFIGS[2:])
    return (cmp_cfg, train_cfg, *rest)


def main(args) -> int:
    cmp_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg = resolve(args)
    save_resolved_config(
        cmp_cfg.out,
        {"compare": cmp_cfg, "train": train_cfg, "alignguard": ag_cfg, "fisher": fisher_cfg, "subspace": subspace_cfg},
    )
    from ..compare_report import format_table

    results = run_compare(cmp_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg)
    print(format_table(results))
    print(f"results: {cmp_cfg.out}/results.json")
    return 0
