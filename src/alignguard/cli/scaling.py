"""`alignguard scaling`: fit the forgetting law L(D) = L0 + A * D^beta per method (docs/design.md §8).

    alignguard scaling --model runs/aligned --out runs/scaling --steps 10 20 40 80 --methods plain_lora alignguard
    alignguard scaling --config configs/scaling/smollm2.yaml --fit_loss huber

Trains each method from scratch at every length in --steps (the compare harness: shared <out>/fisher and
<out>/base), measures the alignment loss (NLL per token of the aligned model's refusals on held-out unsafe
prompts) and the DriftCheck refusal rate, and writes <out>/scaling/scaling.json and scaling.md. Re-running the
same command skips measured points.
"""

from __future__ import annotations

from pathlib import Path

from ..config import AlignGuardConfig, FisherConfig, SubspaceConfig
from ..recipes.common import check_output_dir
from ..recipes.scaling import ScalingConfig, run_scaling
from ..recipes.train import TrainRunConfig
from .common import add_config_subcommand, resolve_configs, save_resolved_config

CONFIGS = (ScalingConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig)
# Fields of TrainRunConfig that scaling sets itself per method and length.
_SET_BY_SCALING = {"model", "out", "method", "fisher", "seed", "max_steps"}


def add_parser(subparsers):
    return add_config_subcommand(
        subparsers,
        "scaling",
        "Forgetting scaling law per method (scaling.json + table).",
        __doc__,
        CONFIGS,
        main,
        excluded={TrainRunConfig: _SET_BY_SCALING},
    )


def resolve(args):
    """(ScalingConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig): defaults < YAML < flags."""
    sc_cfg = resolve_configs(args, (ScalingConfig,), known=CONFIGS)[0]
    # method/fisher are set per method by compare.run_method, max_steps per length; recorded here as the longest.
    fixed = {
        "method": "lora",
        "model": sc_cfg.model,
        "out": sc_cfg.out,
        "fisher": None,
        "seed": sc_cfg.seed,
        "max_steps": max(sc_cfg.steps),
    }
    return (sc_cfg, *resolve_configs(args, CONFIGS[1:], overrides={TrainRunConfig: fixed}, known=CONFIGS))


def main(args) -> int:
    sc_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg = resolve(args)
    configs = dict(scaling=sc_cfg, train=train_cfg, alignguard=ag_cfg, fisher=fisher_cfg, subspace=subspace_cfg)
    check_output_dir(sc_cfg.out, "scaling", configs, sc_cfg.overwrite)
    save_resolved_config(sc_cfg.out, configs)
    run_scaling(sc_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg)
    print((Path(sc_cfg.out) / "scaling" / "scaling.md").read_text())
    print(f"scaling: {sc_cfg.out}/scaling/scaling.json")
    return 0
