"""`alignguard scaling`: fit the forgetting law L(D) = L0 + A * D^beta per method (DESIGN.md §8).

    alignguard scaling --model runs/aligned --out runs/scaling --steps 10 20 40 80 --methods plain_lora alignguard
    alignguard scaling --config configs/scaling/smollm2.yaml --fit_loss huber

Trains each method from scratch at every length in --steps (the compare harness: shared <out>/fisher and
<out>/base), measures the alignment loss (NLL per token of the aligned model's refusals on held-out unsafe
prompts) and the DriftCheck refusal rate, and writes <out>/scaling/scaling.json and scaling.md. Re-running the
same command skips measured points.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import AlignGuardConfig, FisherConfig, SubspaceConfig
from ..scaling_run import ScalingConfig, run_scaling
from ..stages import TrainRunConfig
from .common import add_dataclass_args, build_dataclass, check_unknown_keys, load_yaml, save_resolved_config

CONFIGS = (ScalingConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig)
# Fields of TrainRunConfig that scaling sets itself per method and length.
_SET_BY_SCALING = {"model", "out", "method", "fisher", "seed", "max_steps"}


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "scaling",
        help="Forgetting scaling law per method (scaling.json + table).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of options (flags given here win).")
    for cls in CONFIGS:
        add_dataclass_args(parser, cls, exclude=_SET_BY_SCALING if cls is TrainRunConfig else ())
    parser.set_defaults(func=main)
    return parser


def resolve(args):
    """(ScalingConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig): defaults < YAML < flags."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    check_unknown_keys(values, list(CONFIGS), args.config or "")
    sc_cfg = build_dataclass(ScalingConfig, values, args)
    train_values = {k: v for k, v in values.items() if k not in _SET_BY_SCALING}
    # `seed` (and model/out) belong to ScalingConfig; keep them from also overriding the fixed train fields.
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in _SET_BY_SCALING})
    train_cfg = build_dataclass(
        TrainRunConfig,
        {**train_values, "method": "lora", "model": sc_cfg.model, "out": sc_cfg.out, "seed": sc_cfg.seed},
        ns,
    )
    rest = tuple(build_dataclass(cls, values, args) for cls in CONFIGS[2:])
    return (sc_cfg, train_cfg, *rest)


def main(args) -> int:
    sc_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg = resolve(args)
    save_resolved_config(
        sc_cfg.out,
        {"scaling": sc_cfg, "train": train_cfg, "alignguard": ag_cfg, "fisher": fisher_cfg, "subspace": subspace_cfg},
    )
    run_scaling(sc_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg)
    print((Path(sc_cfg.out) / "scaling" / "scaling.md").read_text())
    print(f"scaling: {sc_cfg.out}/scaling/scaling.json")
    return 0
