"""`alignguard calibrate`: choose lambda for a drift budget from short probe runs, then train with it.

    alignguard calibrate --model runs/aligned --out runs/calibrate --drift_budget 10 --lambdas 1 10 100 1000
    alignguard calibrate --config configs/smollm2/compare.yaml --out runs/smollm2-calibrate --drift_budget 10

Probe runs (`--probe_steps` of `--max_steps`) at each of `--lambdas` (the AlignGuardConfig weight named by
`--knob`, lambda_a by default) are evaluated by DriftCheck on `--probe_prompts` (the bundled calibration split,
disjoint from the evaluation split); drift(lambda) and task(lambda) are fitted (isotonic in log lambda, bootstrap
over prompts); the smallest lambda whose predicted drift (upper bound by default) is within `--drift_budget` points
is trained for the full `--max_steps` with each of `--seeds` and evaluated on `--prompts` (default: the standard
split). Writes <out>/calibration.json, calibration.md and calibration.png; re-running the same command resumes
(finished probes and final runs are reused). A compare preset works as --config (its `methods` are ignored, its
`seeds` are the final runs' seeds); give another --out than the preset's.
"""

from __future__ import annotations

from pathlib import Path

from ..config import AlignGuardConfig, FisherConfig, SubspaceConfig
from ..recipes.calibrate import CalibrateConfig, run_calibrate
from ..recipes.common import check_output_dir
from ..recipes.compare import CompareConfig
from ..recipes.train import TrainRunConfig
from .common import Command, Section, save_resolved_config


def _train_fields(done: dict) -> dict:
    # model/out come from --model/--out; method, fisher and seed are set per row by compare.run_method, and
    # max_steps is the final run's length (the probes run `probe_steps` of it).
    cal = done["calibrate"]
    return {"model": cal.model, "out": cal.out, "overwrite": False, "method": "lora", "fisher": None, "seed": 0}


COMMAND = Command(
    "calibrate",
    "Choose lambda for a drift budget (probes, fit, final run).",
    __doc__,
    [
        Section("calibrate", CalibrateConfig),
        Section("train", TrainRunConfig, ("model", "out", "overwrite", "method", "fisher", "seed"), _train_fields),
        Section("alignguard", AlignGuardConfig),
        Section("fisher", FisherConfig),
        Section("subspace", SubspaceConfig),
    ],
    yaml_also=(CompareConfig,),  # a compare preset's `methods:` is accepted and ignored
)


def add_parser(subparsers):
    return COMMAND.add_parser(subparsers, main)


def resolve(args):
    """(CalibrateConfig, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig): defaults < YAML < flags."""
    return tuple(COMMAND.resolve(args).values())


def main(args) -> int:
    cal_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg = resolve(args)
    configs = dict(calibrate=cal_cfg, train=train_cfg, alignguard=ag_cfg, fisher=fisher_cfg, subspace=subspace_cfg)
    check_output_dir(cal_cfg.out, "calibrate", configs, cal_cfg.overwrite)
    save_resolved_config(cal_cfg.out, configs)
    run_calibrate(cal_cfg, train_cfg, ag_cfg, fisher_cfg, subspace_cfg)
    print((Path(cal_cfg.out) / "calibration.md").read_text())
    print(f"calibration: {cal_cfg.out}/calibration.json, plot {cal_cfg.out}/calibration.png")
    return 0
