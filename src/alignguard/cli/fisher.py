"""`alignguard fisher`: Fisher factors and alignment subspaces of a model on alignment data.

alignguard fisher --model smollm2-135m-instruct --out runs/fisher
alignguard fisher --config configs/fisher.yaml --energy 0.95
"""

from __future__ import annotations

from ..config import FisherConfig, SubspaceConfig
from ..stages import FisherRunConfig, run_fisher
from .common import add_dataclass_args, build_dataclass, check_unknown_keys, load_yaml, save_resolved_config

CONFIGS = (FisherRunConfig, FisherConfig, SubspaceConfig)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "fisher",
        help="Estimate Fisher factors + alignment subspaces.",
        description=__doc__,
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
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
    run_cfg, fisher_cfg, subspace_cfg = resolve(args)
    save_resolved_config(run_cfg.out, {"run": run_cfg, "fisher": fisher_cfg, "subspace": subspace_cfg})
    _, subspaces = run_fisher(run_cfg, fisher_cfg, subspace_cfg)
    ms = [v["m"] for v in subspaces.summary().values()]
    print(
        f"Fisher state and {len(ms)} subspaces (m: min {min(ms)}, mean {sum(ms) / len(ms):.1f}, max {max(ms)}) "
        f"written to {run_cfg.out}"
    )
    return 0
