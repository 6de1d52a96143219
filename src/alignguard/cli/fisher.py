"""`alignguard fisher`: Fisher factors and alignment subspaces of a model on alignment data.

alignguard fisher --model smollm2-135m-instruct --out runs/fisher
alignguard fisher --config configs/fisher.yaml --energy 0.95
"""

from __future__ import annotations

from ..config import FisherConfig, SubspaceConfig
from ..recipes.common import check_output_dir
from ..recipes.fisher import FisherRunConfig, run_fisher
from .common import Command, Section, save_resolved_config

COMMAND = Command(
    "fisher",
    "Estimate Fisher factors + alignment subspaces.",
    __doc__,
    [Section("run", FisherRunConfig), Section("fisher", FisherConfig), Section("subspace", SubspaceConfig)],
)


def add_parser(subparsers):
    return COMMAND.add_parser(subparsers, main)


def resolve(args):
    """(FisherRunConfig, FisherConfig, SubspaceConfig): defaults < YAML < flags."""
    return tuple(COMMAND.resolve(args).values())


def main(args) -> int:
    run_cfg, fisher_cfg, subspace_cfg = resolve(args)
    configs = {"run": run_cfg, "fisher": fisher_cfg, "subspace": subspace_cfg}
    check_output_dir(run_cfg.out, "fisher", configs, run_cfg.overwrite)
    save_resolved_config(run_cfg.out, {"run": run_cfg, "fisher": fisher_cfg, "subspace": subspace_cfg})
    _, subspaces = run_fisher(run_cfg, fisher_cfg, subspace_cfg)
    ms = [v["m"] for v in subspaces.summary().values()]
    print(
        f"Fisher state and {len(ms)} subspaces (m: min {min(ms)}, mean {sum(ms) / len(ms):.1f}, max {max(ms)}) "
        f"written to {run_cfg.out}"
    )
    return 0
