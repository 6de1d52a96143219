"""How learnable is a task for a model: its accuracy before and after the demo's short LoRA fine-tune.

    python scripts/task_probe.py --model ~/.cache/alignguard/aligned/<demo model> --task word_problems_easy

Trains plain LoRA with the demo's settings (96 examples, 30 steps, r=8, lr 2e-3) at poison 0 and 0.2 into
`--out/<task>-<poison>`, scores `--n` held-out problems before and after, prints one line per model and writes
`--out/<task>.json` (atomically). Used to choose the demo's task level (README, "Data").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from alignguard.io import atomic_write_json
from alignguard.models import load_model_and_tokenizer
from alignguard.recipes.compare import task_metric
from alignguard.recipes.train import TrainRunConfig, run_train
from alignguard.tasks import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="aligned model (registry name or folder)")
    parser.add_argument("--task", default="word_problems_easy", choices=TASKS)
    parser.add_argument("--steps", type=int, default=30, help="LoRA steps (the demo's 30)")
    parser.add_argument("--n", type=int, default=60, help="held-out problems scored")
    parser.add_argument("--out", default="runs/task_probe", help="folder for the adapters and the JSON")
    args = parser.parse_args()
    out = Path(args.out)
    model, tok = load_model_and_tokenizer(args.model)[:2]
    model.eval()
    with torch.no_grad():
        before = task_metric(model, tok, args.task, args.n, 0, 32, None)
    result = {"model": args.model, "task": args.task, "n": args.n, "steps": args.steps, "before": before["accuracy"]}
    print(f"{args.task}: before fine-tuning {before['accuracy']:.3f}", flush=True)
    for poison in (0.0, 0.2):
        cfg = TrainRunConfig(
            model=args.model, out=str(out / f"{args.task}-{poison}"), method="lora", task=args.task, n_train=96,
            poison_ratio=poison, max_steps=args.steps, lora_r=8, lora_alpha=16.0, learning_rate=2e-3,
            max_length=256, save_steps=args.steps, seed=0,
        )  # fmt: skip
        tuned = run_train(cfg, progress=False)["peft_model"]
        tuned.eval()
        with torch.no_grad():
            after = task_metric(tuned, tok, args.task, args.n, 0, 32, None)
        result[f"after_poison_{poison}"] = after["accuracy"]
        print(f"{args.task}: after {args.steps} steps at poison {poison}: {after['accuracy']:.3f}", flush=True)
    atomic_write_json(out / f"{args.task}.json", result)


if __name__ == "__main__":
    main()
