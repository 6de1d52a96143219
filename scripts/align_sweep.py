"""One alignment SFT, evaluated on its own, then several DPO variants from the same SFT model.

    python scripts/align_sweep.py --out runs/align_sweep/E1 \\
        --sft '{"max_examples": 480, "safe_fraction": 0.55, "lookalike_fraction": 0.5, "max_steps": 90,
                "learning_rate": 5e-4, "max_new_tokens": 48}' \\
        --dpo '[{"label": "d3", "dpo_steps": 24, "dpo_learning_rate": 1e-4, "dpo_safe_fraction": 0.5,
                 "dpo_examples": 96}]'

`--sft` holds `AlignRunConfig` fields of the SFT stage; each `--dpo` entry overrides DPO fields of it (and a
`label`). It runs exactly the stages of `alignguard align` (same sampling, self-distillation, SFT, preference
pairs or mined own mistakes, DPO), but trains the SFT once and evaluates every model with DriftCheck (pattern judge, 32 new tokens) on
`--prompts` (default: the calibration split, disjoint from the standard split the README reports on), and on
`--task_n` test problems of `--task` (accuracy and the share refused, as in align's report). Writes
`<out>/results.json` after every model (atomically); a rerun skips what is done. Each DPO model is saved under
`<out>/model_<label>` (a normal HF folder: `alignguard align` with the same fields gives the same weights).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from alignguard.driftcheck.generate import GenerationSettings
from alignguard.driftcheck.prompts import load_prompts, resolve_prompts
from alignguard.driftcheck.run import run_driftcheck
from alignguard.io import atomic_write_json
from alignguard.models import load_model_and_tokenizer
from alignguard.recipes.align import (
    AlignRunConfig,
    alignment_examples,
    base_generations,
    preference_stage,
    sft_pairs,
    sft_stage,
)
from alignguard.recipes.align_report import refusal_summary
from alignguard.tasks import evaluate_task


def evaluate(model, tok, records, label: str, task: str, task_n: int, folder: Path) -> dict:
    """Refusal rates (and the task score) of one model; its completions are kept in <folder>/driftcheck_<label>/ and
    its task answers in <folder>/generation_cache/, so a surprising number can be read back."""
    t = time.time()
    gen = GenerationSettings(max_new_tokens=32, batch_size=32)
    result = run_driftcheck(
        model, records, tokenizer=tok, judge="pattern", settings=gen, n_boot=50, progress=False,
        out_dir=folder / f"driftcheck_{label}",
    )  # fmt: skip
    s = refusal_summary(result.per_prompt)
    keys = ("refusal_unsafe", "over_refusal_safe", "over_refusal_lookalike", "over_refusal_other_safe")
    out = {k: s[k]["rate"] for k in keys}
    out["per_category"] = {c: v["rate"] for c, v in s["refusal_per_category"].items()}
    if task != "none":  # the same task score as align's report (seed 0 test problems)
        scored = evaluate_task(model, tok, task, task_n, 0, 32, str(folder / "generation_cache"))
        out["task_accuracy"] = scored["accuracy"]
        out["task_refused"] = scored["n_refused"] / scored["n"]
    out["eval_seconds"] = round(time.time() - t)
    task_text = f"  task {out['task_accuracy']:.3f} (refused {out['task_refused']:.3f})" if task != "none" else ""
    print(
        f"[{label}] refusal {out['refusal_unsafe']:.3f}  over-refusal {out['over_refusal_safe']:.3f}  "
        f"look-alikes {out['over_refusal_lookalike']:.3f}{task_text}",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="sweep folder")
    parser.add_argument("--sft", required=True, help="AlignRunConfig fields of the SFT stage, as JSON")
    parser.add_argument("--dpo", default="[]", help="JSON list of DPO overrides, each with a label")
    parser.add_argument("--prompts", default="calibration", help="split name or prompt file to evaluate on")
    parser.add_argument("--task", default="word_problems_easy", help="task scored on every model ('none': skip)")
    parser.add_argument("--task_n", type=int, default=100, help="test problems of --task to score")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    base = AlignRunConfig(
        out=str(root / "sft"), generation_cache=str(root / "gen_cache"), eval_prompts="none", **json.loads(args.sft)
    )
    overrides = {v["label"]: {k: x for k, x in v.items() if k != "label"} for v in json.loads(args.dpo)}
    variants = {label: replace(base, **fields) for label, fields in overrides.items()}
    records = load_prompts(resolve_prompts(args.prompts))
    model, tok, _ = load_model_and_tokenizer(base.model)
    sft, _ = alignment_examples(base)
    dpo_sets = {label: alignment_examples(cfg)[1] for label, cfg in variants.items()}
    answers = base_generations(model, tok, base, sft, [e for d in dpo_sets.values() for e in d], False)
    sft_dir = root / "sft_model"
    if not (sft_dir / "config.json").is_file():
        t = time.time()
        merged, _ = sft_stage(model, tok, sft_pairs(sft, answers, base.seed), base, root / "sft", False)
        merged.save_pretrained(str(sft_dir))
        tok.save_pretrained(str(sft_dir))
        results["sft_seconds"] = round(time.time() - t)
        results["sft_config"] = json.loads(args.sft)
    if "sft" not in results:
        results["sft"] = evaluate(
            *load_model_and_tokenizer(str(sft_dir))[:2], records, "sft", args.task, args.task_n, root
        )
        atomic_write_json(results_path, results)
    for label, cfg in variants.items():
        if label in results:
            continue
        sft_model, sft_tok, _ = load_model_and_tokenizer(str(sft_dir))  # DPO merges in place: start afresh
        t = time.time()
        merged, info = preference_stage(
            sft_model, sft_tok, cfg, dpo_sets[label], answers, root / f"dpo_{label}", False
        )
        row = {"dpo_seconds": round(time.time() - t), "n_pairs": info["n_pairs"], "dpo": overrides[label]}
        row["n_own_rejected"] = info.get("n_own_rejected")
        row.update(evaluate(merged, sft_tok, records, label, args.task, args.task_n, root))
        merged.save_pretrained(str(root / f"model_{label}"))
        sft_tok.save_pretrained(str(root / f"model_{label}"))
        results[label] = row
        atomic_write_json(results_path, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
