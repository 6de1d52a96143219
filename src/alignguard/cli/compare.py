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
from .common import add_config_subcommand, resolve_configs, save_resolved_config

CONFIGS = (CompareConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig)
# Fields of TrainRunConfig that compare sets itself per method.
_SET_BY_COMPARE = {"model", "out", "method", "fisher", "seed"}


def add_parser(subparsers):
    return add_config_subcommand(
        subparsers,
        "compare",
        "Compare methods (table + results.json).",
        __doc__,
        CONFIGS,
        main,
        excluded={TrainRunConfig: _SET_BY_COMPARE},
    )


def resolve(args):
    cmp_cfg = resolve_configs(args, (CompareConfig,), known=CONFIGS)[0]
    # method/fisher/seed are set per method and seed by run_compare; here only the shared training options.
    fixed = {"method": "lora", "model": cmp_cfg.model, "out": cmp_cfg.out, "fisher": None, "seed": 0}
    return (cmp_cfg, *resolve_configs(args, CONFIGS[1:], overrides={TrainRunConfig: fixed}, known=CONFIGS))


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
