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

from ..recipes.scaling import ScalingConfig, run_scaling
from .harness_command import SET_BY_HARNESS, harness_command, prepare_harness_run

# The harness sets max_steps per length; the saved config records the longest.
COMMAND = harness_command(
    "scaling",
    "Forgetting scaling law per method (scaling.json + table).",
    __doc__,
    ScalingConfig,
    set_by=SET_BY_HARNESS + ("max_steps",),
    extra_fields={"seed": lambda sc: sc.seed, "max_steps": lambda sc: max(sc.steps)},
)


def add_parser(subparsers):
    return COMMAND.add_parser(subparsers, main)


def resolve(args):
    """(ScalingConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig): defaults < YAML < flags."""
    return tuple(COMMAND.resolve(args).values())


def main(args) -> int:
    sc_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg = prepare_harness_run(COMMAND, args)
    run_scaling(sc_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg)
    print((Path(sc_cfg.out) / "scaling" / "scaling.md").read_text())
    print(f"scaling: {sc_cfg.out}/scaling/scaling.json")
    return 0
