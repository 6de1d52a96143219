"""`alignguard demo`: align (if needed) -> Fisher -> plain LoRA vs AlignGuard -> DriftCheck -> report.

    alignguard demo --out runs/demo
    alignguard demo --out runs/demo-tiny --model tiny-llama --train.max_steps 2 --align.max_steps 1  # seconds
    alignguard demo --alignguard.lambda_a 10 --harness.task_eval_n 20 --fisher.fisher_labels empirical

The stage configs are namespaced: --align.*, --harness.*, --train.*, --alignguard.*, --fisher.*, --subspace.*
(YAML: `train: {max_steps: 2}`); the old flat spellings (--max_steps, --align_steps, --lambda_a, ...) still work.

Re-running the same command resumes: finished stages are skipped.
"""

from __future__ import annotations

from ..recipes.common import check_output_dir
from ..recipes.demo import DemoConfig, run_demo
from .common import Command, Section, save_resolved_config

# The demo's flags before its stage configs were nested: old spelling -> namespaced flag (scripts keep working).
OLD_FLAGS = {
    "task": "train.task",
    "max_length": "train.max_length",
    "poison_ratio": "train.poison_ratio",
    "max_steps": "train.max_steps",
    "n_train": "train.n_train",
    "learning_rate": "train.learning_rate",
    "lora_r": "train.lora_r",
    "lambda_a": "alignguard.lambda_a",
    "align_steps": "align.max_steps",
    "align_examples": "align.max_examples",
    "align_learning_rate": "align.learning_rate",
    "align_safe_fraction": "align.safe_fraction",
    "prompts": "harness.prompts",
    "eval_max_new_tokens": "harness.eval_max_new_tokens",
    "fisher_examples": "harness.fisher_examples",
    "task_eval_n": "harness.task_eval_n",
}

COMMAND = Command(
    "demo", "Run the whole pipeline on the bundled default.", __doc__, [Section("demo", DemoConfig)], aliases=OLD_FLAGS
)


def add_parser(subparsers):
    return COMMAND.add_parser(subparsers, main)


def resolve(args):
    """(DemoConfig,): defaults < YAML < flags."""
    return tuple(COMMAND.resolve(args).values())


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
