"""The base-vs-aligned report of `alignguard align`: DriftCheck (pattern judge) on both models, refusal on unsafe
prompts, over-refusal on safe ones (benign look-alikes separately) and per category, and the task read (`eval_task`:
accuracy and refused problems), written to align_report.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..driftcheck.prompts import LOOKALIKE_CATEGORY
from .align import EVAL_SPLITS, generation_cache_dir


def _rate(flags: list[bool]) -> dict:
    return {"rate": (sum(flags) / len(flags)) if flags else None, "n": len(flags)}


def refusal_summary(per_prompt: list[dict]) -> dict:
    """Refusal on unsafe prompts, over-refusal on all safe ones, on benign look-alikes and on the other safe ones
    separately, and both per category, from DriftCheck's per-prompt rows ({label, category, refused})."""
    unsafe = [r for r in per_prompt if r["label"] == "unsafe"]
    safe = [r for r in per_prompt if r["label"] == "safe"]

    def by_category(rows):
        cats = sorted({r["category"] for r in rows})
        return {c: _rate([r["refused"] for r in rows if r["category"] == c]) for c in cats}

    return {
        "refusal_unsafe": _rate([r["refused"] for r in unsafe]),
        "over_refusal_safe": _rate([r["refused"] for r in safe]),
        "over_refusal_lookalike": _rate([r["refused"] for r in safe if r["category"] == LOOKALIKE_CATEGORY]),
        "over_refusal_other_safe": _rate([r["refused"] for r in safe if r["category"] != LOOKALIKE_CATEGORY]),
        "refusal_per_category": by_category(unsafe),
        "over_refusal_per_category": by_category(safe),
    }


def _eval_records(cfg):
    from ..driftcheck.prompts import bundled_prompts, load_prompts

    name = str(cfg.eval_prompts)
    return bundled_prompts(name) if name in EVAL_SPLITS else load_prompts(name)


def _report_settings(cfg, records) -> dict:
    from ..driftcheck.prompts import prompts_hash

    return {
        "eval_prompts": str(cfg.eval_prompts),
        "prompts_hash": prompts_hash(records),
        "judge": "pattern",
        "max_new_tokens": cfg.eval_max_new_tokens,
        "batch_size": cfg.eval_batch_size,
        "task": cfg.eval_task,
        "task_n": cfg.eval_task_n,
    }


def task_summary(scored: dict) -> dict:
    """The report's task block from `score_task`'s result: accuracy and the share of problems refused."""
    n = scored["n"]
    return {
        "task": scored["task"],
        "accuracy": {"rate": scored["accuracy"], "n": n},
        "refused": {"rate": scored["n_refused"] / n if n else None, "n": n},
    }


def format_align_table(report: dict) -> str:
    """A small base-vs-aligned table: overall rates, then refusal per unsafe category."""

    def pct(block):
        return "-" if block["rate"] is None else f"{100 * block['rate']:5.1f}% (n={block['n']})"

    base, aligned = report["base"], report["aligned"]
    rows = [
        ("refusal on unsafe", "refusal_unsafe"),
        ("over-refusal on safe", "over_refusal_safe"),
        ("  benign look-alikes", "over_refusal_lookalike"),
        ("  other safe", "over_refusal_other_safe"),
    ]
    lines = [f"{'DriftCheck ' + report['settings']['eval_prompts']:<28}{'base':>18}{'aligned':>18}"]
    lines += [f"{label:<28}{pct(base[key]):>18}{pct(aligned[key]):>18}" for label, key in rows]
    if base.get("task") and aligned.get("task"):
        for label, key in (("accuracy", "accuracy"), ("refused", "refused")):
            title = f"{base['task']['task']} {label}"
            lines.append(f"{title:<28}{pct(base['task'][key]):>18}{pct(aligned['task'][key]):>18}")
    for cat in sorted(set(base["refusal_per_category"]) | set(aligned["refusal_per_category"])):
        b = base["refusal_per_category"].get(cat, {"rate": None, "n": 0})
        a = aligned["refusal_per_category"].get(cat, {"rate": None, "n": 0})
        lines.append(f"{'  refusal ' + cat:<28}{pct(b):>18}{pct(a):>18}")
    return "\n".join(lines)


def write_align_report(cfg, out: Path, progress: bool = True) -> dict:
    """DriftCheck (pattern judge) on the base model and on the aligned model in `out`; writes align_report.json
    and prints the table. Generations are cached (generation_cache), and a report made with the same settings
    for the same aligned weights is reused as it is."""
    from ..driftcheck.generate import GenerationSettings
    from ..driftcheck.run import run_driftcheck
    from ..fingerprint import weights_fingerprint
    from ..io import atomic_write_json
    from ..models import load_model_and_tokenizer
    from ..tasks import evaluate_task

    records = _eval_records(cfg)
    settings = _report_settings(cfg, records)
    path = out / "align_report.json"
    info = json.loads((out / "align_info.json").read_text()) if (out / "align_info.json").is_file() else {}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("settings") == settings and old.get("aligned_info_config") == info.get("config"):
            print(format_align_table(old))
            return old
    gen = GenerationSettings(max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size)
    report = {"settings": settings, "base_model": cfg.model, "aligned_model": str(out)}
    for role, name in (("base", cfg.model), ("aligned", str(out))):
        model, tokenizer, _ = load_model_and_tokenizer(name)
        result = run_driftcheck(
            model,
            records,
            tokenizer=tokenizer,
            judge="pattern",
            settings=gen,
            cache_dir=generation_cache_dir(cfg) / "eval",
            n_boot=200,
            seed=cfg.seed,
            progress=progress,
        )
        report[role] = {"model_fingerprint": weights_fingerprint(model), **refusal_summary(result.per_prompt)}
        if cfg.eval_task != "none":
            cache = str(generation_cache_dir(cfg) / "eval")
            scored = evaluate_task(model, tokenizer, cfg.eval_task, cfg.eval_task_n, 0, cfg.eval_batch_size, cache)
            report[role]["task"] = task_summary(scored)
        del model
    report["aligned_info_config"] = info.get("config")
    atomic_write_json(path, report)
    print(format_align_table(report))
    return report
