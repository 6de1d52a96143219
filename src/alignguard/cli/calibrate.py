"""`alignguard calibrate`: choose lambda for a drift budget from short probe runs, then train with it.

    alignguard calibrate --model runs/aligned --out runs/calibrate --drift_budget 10 --lambdas 1 10 100 1000
    alignguard calibrate --config configs/smollm2/compare.yaml --out runs/smollm2-calibrate --drift_budget 10

Probe runs (`--probe_steps` of `--max_steps`) at each of `--lambdas` (the weight named by `--knob`: lambda_a by
default; `--method ewc` keeps lambda_a, `--method asft --knob asft_lambda` and `--method lisa --knob lisa_rho` set a
peer's own weight) are evaluated by DriftCheck on `--probe_prompts` (the bundled calibration split,
disjoint from the evaluation split); drift(lambda) and task(lambda) are fitted (isotonic in log lambda, bootstrap
over prompts); the smallest lambda whose predicted drift (upper bound by default) is within `--drift_budget` points
is trained for the full `--max_steps` with each of `--seeds` and evaluated on `--prompts` (default: the standard
split). Writes <out>/calibration.json, calibration.md and calibration.png; re-running the same command resumes
(finished probes and final runs are reused). A compare preset works as --config (its `methods` are ignored, its
`seeds` are the final runs' seeds); give another --out than the preset's.
"""

from __future__ import annotations

from pathlib import Path

from ..recipes.calibrate import CalibrateConfig, run_calibrate
from ..recipes.compare import CompareConfig
from .harness_command import harness_command, prepare_harness_run

COMMAND = harness_command(
    "calibrate",
    "Choose lambda for a drift budget (probes, fit, final run).",
    __doc__,
    CalibrateConfig,
    yaml_also=(CompareConfig,),  # a compare preset's `methods:` is accepted and ignored
)


def add_parser(subparsers):
    return COMMAND.add_parser(subparsers, main)


def resolve(args):
    """(CalibrateConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig): defaults < YAML < flags."""
    return tuple(COMMAND.resolve(args).values())


def main(args) -> int:
    cal_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg = prepare_harness_run(COMMAND, args)
    run_calibrate(cal_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg)
    print((Path(cal_cfg.out) / "calibration.md").read_text())
    print(f"calibration: {cal_cfg.out}/calibration.json, plot {cal_cfg.out}/calibration.png")
    return 0
