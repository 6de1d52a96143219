"""`alignguard compare`: plain LoRA, AlignGuard, its ablations and the baselines on the same data and seeds.

    alignguard compare --model runs/aligned --out runs/compare --poison_ratio 0.2 --max_steps 50
    alignguard compare --config configs/compare/smollm2.yaml --seeds 0 1 2

Methods: plain_lora, alignguard, ag_no_alignment, ag_no_task, ag_no_overlap, ag_no_geodesic, ag_project,
ag_kfac (two-sided K-FAC alignment term), random_subspace, ewc, ewc_kfac, safe_lora, replay, alignguard_replay.
Writes <out>/results.json and <out>/results.md;
re-running the same command resumes (finished methods are skipped).
"""

from __future__ import annotations

from ..config import AlignGuardConfig, FisherConfig, SubspaceConfig
from ..recipes.common import check_output_dir
from ..recipes.compare import CompareConfig, run_compare
from ..recipes.train import TrainRunConfig
from .common import Command, Section, save_resolved_config


def _train_fields(done: dict) -> dict:
    # model/out come from --model/--out (--overwrite empties the whole run folder first); method, fisher and seed
    # are set per method and seed by run_compare.
    cmp = done["compare"]
    return {"model": cmp.model, "out": cmp.out, "overwrite": False, "method": "lora", "fisher": None, "seed": 0}


COMMAND = Command(
    "compare",
    "Compare methods (table + results.json).",
    __doc__,
    [
        Section("compare", CompareConfig),
        Section("train", TrainRunConfig, ("model", "out", "overwrite", "method", "fisher", "seed"), _train_fields),
        Section("alignguard", AlignGuardConfig),
        Section("fisher", FisherConfig),
        Section("subspace", SubspaceConfig),
    ],
)


def add_parser(subparsers):
    return COMMAND.add_parser(subparsers, main)


def resolve(args):
    """(CompareConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig): defaults < YAML < flags."""
    return tuple(COMMAND.resolve(args).values())


def main(args) -> int:
    cmp_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg = resolve(args)
    configs = dict(compare=cmp_cfg, train=train_cfg, alignguard=ag_cfg, fisher=fisher_cfg, subspace=subspace_cfg)
    check_output_dir(cmp_cfg.out, "compare", configs, cmp_cfg.overwrite)
    save_resolved_config(cmp_cfg.out, configs)
    from ..report.compare_table import format_table

    results = run_compare(cmp_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg)
    print(format_table(results))
    print(f"results: {cmp_cfg.out}/results.json")
    return 0
