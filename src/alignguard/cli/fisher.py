"""`alignguard fisher`: Fisher factors and alignment subspaces of a model on alignment data.

alignguard fisher --model smollm2-135m-instruct --out runs/fisher
alignguard fisher --config configs/fisher.yaml --energy 0.95
"""

from __future__ import annotations

from ..config import FisherConfig, SubspaceConfig
from ..recipes.common import check_output_dir
from ..recipes.fisher import FisherRunConfig, run_fisher
from .common import add_config_subcommand, resolve_configs, save_resolved_config

CONFIGS = (FisherRunConfig, FisherConfig, SubspaceConfig)


def add_parser(subparsers):
    return add_config_subcommand(
        subparsers, "fisher", "Estimate Fisher factors + alignment subspaces.", __doc__, CONFIGS, main
    )


def resolve(args):
    return resolve_configs(args, CONFIGS)


def main(args) -> int:
    run_cfg, fisher_cfg, subspace_cfg = resolve(args)
    configs = {"run": run_cfg, "fisher": fisher_cfg, "subspace": subspace_cfg}
    check_output_dir(run_cfg.out, "fisher", configs, run_cfg.overwrite)
    save_resolved_config(run_cfg.out, configs)
    _, subspaces = run_fisher(run_cfg, fisher_cfg, subspace_cfg)
    ms = [v["m"] for v in subspaces.summary().values()]
    print(
        f"Fisher state and {len(ms)} subspaces (m: min {min(ms)}, mean {sum(ms) / len(ms):.1f}, max {max(ms)}) "
        f"written to {run_cfg.out}"
    )
    return 0
