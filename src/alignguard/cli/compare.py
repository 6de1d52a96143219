"""`alignguard compare`: plain LoRA, AlignGuard, its ablations and the baselines on the same data and seeds.

    alignguard compare --model runs/aligned --out runs/compare --poison_ratio 0.2 --max_steps 50
    alignguard compare --config configs/compare/smollm2.yaml --seeds 0 1 2

Methods: plain_lora, alignguard, ag_no_alignment, ag_no_task, ag_no_overlap, ag_no_geodesic, ag_project,
ag_kfac (two-sided K-FAC alignment term), random_subspace, ewc, ewc_kfac, safe_lora, replay, alignguard_replay,
and the peers and variants asft, lox, surgery (gradient surgery), lisa (bi-state optimisation), self_screen
(self-screened data); any of them with per-row overrides (`alignguard@lambda_a=1000`, `plain_lora@poison_ratio=0`).
Writes <out>/results.json and <out>/results.md;
re-running the same command resumes (finished methods are skipped).
"""

from __future__ import annotations

from ..recipes.compare import CompareConfig, run_compare
from .harness_command import harness_command, prepare_harness_run

COMMAND = harness_command("compare", "Compare methods (table + results.json).", __doc__, CompareConfig)


def add_parser(subparsers):
    return COMMAND.add_parser(subparsers, main)


def resolve(args):
    """(CompareConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig): defaults < YAML < flags."""
    return tuple(COMMAND.resolve(args).values())


def main(args) -> int:
    cmp_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg = prepare_harness_run(COMMAND, args)
    from ..report.compare_table import format_table

    results = run_compare(cmp_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg)
    print(format_table(results))
    print(f"results: {cmp_cfg.out}/results.json")
    return 0
