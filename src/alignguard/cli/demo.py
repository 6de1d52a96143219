"""`alignguard demo`: align (if needed) -> Fisher -> plain LoRA vs AlignGuard -> DriftCheck -> report.

    alignguard demo --out runs/demo
    alignguard demo --out runs/demo-tiny --model tiny-llama --max_steps 2     # a smoke run in seconds

Re-running the same command resumes: finished stages are skipped.
"""

from __future__ import annotations

from ..recipes.common import check_output_dir
from ..recipes.demo import DemoConfig, run_demo
from .common import add_config_subcommand, resolve_configs, save_resolved_config


def add_parser(subparsers):
    return add_config_subcommand(
        subparsers, "demo", "Run the whole pipeline on the bundled default.", __doc__, (DemoConfig,), main
    )


def resolve(args):
    return resolve_configs(args, (DemoConfig,))


def main(args) -> int:
    (cfg,) = resolve(args)
    check_output_dir(cfg.out, "demo", {"demo": cfg}, getattr(cfg, "overwrite", False), "demo_config.yaml")
    save_resolved_config(cfg.out, {"demo": cfg}, name="demo_config.yaml")
    result = run_demo(cfg)
    print("\n" + result["table"])
    print(f"demo finished in {result['seconds'] / 60:.1f} min; results: {cfg.out}/results.json")
    if result["report"]:
        print(f"report: {result['report']}")
    return 0
