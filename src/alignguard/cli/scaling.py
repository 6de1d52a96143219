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
from .common import Command, Section, save_resolved_config

_SET_BY_SCALING = ("model", "out", "overwrite", "seed", "method", "fisher", "max_steps")


def _train_fields(done: dict) -> dict:
    # model/out/seed come from the scaling flags (--overwrite empties the whole run folder first); method/fisher
    # are set per method by compare.run_method and max_steps per length (recorded here as the longest).
    sc = done["scaling"]
    return {
        "model": sc.model,
        "out": sc.out,
        "overwrite": False,
        "seed": sc.seed,
        "method": "lora",
        "fisher": None,
        "max_steps": max(sc.steps),
    }


COMMAND = Command(
    "scaling",
    "Forgetting scaling law per method (scaling.json + table).",
    __doc__,
    [
        Section("scaling", ScalingConfig),
        Section("train", TrainRunConfig, _SET_BY_SCALING, _train_fields),
        Section("alignguard", AlignGuardConfig),
        Section("fisher", FisherConfig),
        Section("subspace", SubspaceConfig),
    ],
)


def add_parser(subparsers):
    return COMMAND.add_parser(subparsers, main)


def resolve(args):
    """(ScalingConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig): defaults < YAML < flags."""
    return tuple(COMMAND.resolve(args).values())


def main(args) -> int:
    sc_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg = resolve(args)
    configs = dict(scaling=sc_cfg, train=train_cfg, alignguard=ag_cfg, fisher=fisher_cfg, subspace=subspace_cfg)
    check_output_dir(sc_cfg.out, "scaling", configs, sc_cfg.overwrite)
    save_resolved_config(sc_cfg.out, configs)
    run_scaling(sc_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg)
    print((Path(sc_cfg.out) / "scaling" / "scaling.md").read_text())
    print(f"scaling: {sc_cfg.out}/scaling/scaling.json")
    return 0
