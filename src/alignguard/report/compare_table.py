"""Aggregate a compare run into one results JSON and a markdown table (no training code here).

results.json schema (version "compare-1"):

    {"schema_version": "compare-1", "model": str, "seeds": [int], "methods": [str], "prompts_hash": str,
     "base": {"refusal_rate": Stat, "over_refusal_rate": Stat, "task_accuracy": float,
              "refusal_rate_by_judge": {judge: Stat}},
     "rows": {method: {"seeds": {seed: Row}, "mean": Summary}},
     "config": {...}}
    Row = {"task_accuracy", "refusal_rate": Stat, "over_refusal_rate": Stat, "drift": Stat,
           "drift_reduction": Stat | null, "step_time_ratio": float | null, "per_category": {cat: float},
           "refusal_rate_by_judge": {judge: Stat}}   (the extra judges' refusal rates on unsafe prompts)
    Summary = {"task_accuracy", "refusal_rate", "over_refusal_rate", "drift", "drift_reduction",
               "step_time_ratio": {"mean", "sd"} each}
    Stat = {"value", "ci_low", "ci_high", "n"}   (95% bootstrap over prompts; paired for drift / reduction)
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..driftcheck.metrics import DriftCheckResult, drift_reduction_stat, drift_stat

SCHEMA_VERSION = "compare-1"


def _load_dc(path: Path) -> DriftCheckResult:
    return DriftCheckResult.from_dict(json.loads(Path(path).read_text()))


def _paired(base: DriftCheckResult, other: DriftCheckResult, label="unsafe"):
    b, o = base.flags_by_id(label), other.flags_by_id(label)
    ids = sorted(set(b) & set(o))
    return [b[i] for i in ids], [o[i] for i in ids], ids


def _stat(s):
    return None if s is None else s.to_dict()


def _by_judge(dc: DriftCheckResult) -> dict:
    return {name: _stat(block.get("refusal_rate")) for name, block in dc.extra_judges.items()}


def aggregate(cfg) -> dict:
    """Read every finished method of a compare run folder and build the results dict (schema above)."""
    out = Path(cfg.out)
    base = _load_dc(out / "base" / "driftcheck" / "results.json")
    base_task = json.loads((out / "base" / "task.json").read_text())
    rows: dict[str, dict] = {}
    for name in cfg.methods:
        rows[name] = {"seeds": {}}
        for seed in cfg.seeds:
            mdir = out / f"seed{seed}" / name
            if not (mdir / "result.json").is_file():
                continue
            res = json.loads((mdir / "result.json").read_text())
            dc = _load_dc(mdir / "driftcheck" / "results.json")
            bflags, mflags, _ = _paired(base, dc)
            row = {
                "task_accuracy": res["task"].get("accuracy"),
                "refusal_rate": _stat(dc.metrics.get("refusal_rate")),
                "over_refusal_rate": _stat(dc.metrics.get("over_refusal_rate")),
                "drift": _stat(drift_stat(bflags, mflags, seed=seed)),
                "drift_reduction": None,
                "step_seconds": res.get("mean_step_seconds"),
                "step_time_ratio": None,
                "per_category": {k: v.value for k, v in dc.metrics.get("per_category_refusal_rate", {}).items()},
                "refusal_rate_by_judge": _by_judge(dc),
            }
            plain_dir = out / f"seed{seed}" / "plain_lora"
            if (plain_dir / "result.json").is_file():
                plain = _load_dc(plain_dir / "driftcheck" / "results.json")
                pb, pf, ids = _paired(base, plain)
                mf = [dc.flags_by_id()[i] for i in ids]
                row["drift_reduction"] = _stat(drift_reduction_stat(pb, pf, mf, seed=seed))
                plain_s = json.loads((plain_dir / "result.json").read_text()).get("mean_step_seconds")
                if plain_s and row["step_seconds"]:
                    row["step_time_ratio"] = row["step_seconds"] / plain_s
            rows[name]["seeds"][seed] = row
        rows[name]["mean"] = _summary(rows[name]["seeds"].values())
    return {
        "schema_version": SCHEMA_VERSION,
        "model": cfg.model,
        "seeds": list(cfg.seeds),
        "methods": list(cfg.methods),
        "prompts_hash": base.prompts_hash,
        "base": {
            "refusal_rate": _stat(base.metrics.get("refusal_rate")),
            "over_refusal_rate": _stat(base.metrics.get("over_refusal_rate")),
            "task_accuracy": base_task.get("accuracy"),
            "per_category": {k: v.value for k, v in base.metrics.get("per_category_refusal_rate", {}).items()},
            "refusal_rate_by_judge": _by_judge(base),
        },
        "rows": rows,
        "config": {k: v for k, v in vars(cfg).items()},
    }


def _value(x):
    return x["value"] if isinstance(x, dict) else x


def _summary(seed_rows) -> dict:
    seed_rows = list(seed_rows)
    out = {}
    for key in ("task_accuracy", "refusal_rate", "over_refusal_rate", "drift", "drift_reduction", "step_time_ratio"):
        vals = [_value(r[key]) for r in seed_rows if r.get(key) is not None and _value(r[key]) is not None]
        out[key] = {
            "mean": statistics.fmean(vals) if vals else None,
            "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "n_seeds": len(vals),
        }
    return out


def _fmt(row_stat, pct=True):
    if row_stat is None:
        return "n/a"
    v, lo, hi = row_stat["value"], row_stat.get("ci_low"), row_stat.get("ci_high")
    scale = 100 if pct else 1
    if lo is None or lo != lo:
        return f"{v * scale:.0f}"
    return f"{v * scale:.0f} [{lo * scale:.0f}, {hi * scale:.0f}]"


def format_table(results: dict) -> str:
    """Markdown table: one row per method (first seed's intervals; mean +- sd over seeds when several)."""
    multi = len(results["seeds"]) > 1
    b = results["base"]
    judges = list(b.get("refusal_rate_by_judge") or {})
    head = (
        "| method | task acc | refusal % [95% CI] | over-refusal % | drift pts | drift reduction % | "
        "step time vs LoRA |" + "".join(f" refusal % ({j}) |" for j in judges)
    )
    lines = [head, "|" + "---|" * (7 + len(judges))]
    lines.append(
        f"| aligned model (no fine-tune) | {b['task_accuracy']:.2f} | {_fmt(b['refusal_rate'])} | "
        f"{_fmt(b['over_refusal_rate'])} | 0 | n/a | n/a |"
        + "".join(f" {_fmt(b['refusal_rate_by_judge'][j])} |" for j in judges)
    )
    for name, row in results["rows"].items():
        if not row["seeds"]:
            continue
        if multi:
            m = row["mean"]

            def ms(key, scale=100, digits=0, unit="", m=m):
                # Same units as the one-seed table: percentages/points, accuracy as a fraction, ratio with "x".
                e = m[key]
                if e["mean"] is None:
                    return "n/a"
                sd = f" ± {e['sd'] * scale:.{digits}f}" if e["sd"] is not None else ""
                return f"{e['mean'] * scale:.{digits}f}{unit}{sd}"

            cells = [
                ms("task_accuracy", 1, 2),
                ms("refusal_rate"),
                ms("over_refusal_rate"),
                ms("drift"),
                ms("drift_reduction"),
                ms("step_time_ratio", 1, 2, "x"),
            ]
        else:
            r = next(iter(row["seeds"].values()))
            ratio = f"{r['step_time_ratio']:.2f}x" if r["step_time_ratio"] else "n/a"
            acc = f"{r['task_accuracy']:.2f}" if r["task_accuracy"] is not None else "n/a"
            cells = [
                acc,
                _fmt(r["refusal_rate"]),
                _fmt(r["over_refusal_rate"]),
                _fmt(r["drift"]),
                _fmt(r["drift_reduction"]),
                ratio,
            ]
        for j in judges:  # first seed's value (with its interval): a check of the judge, not a headline number
            by_judge = next(iter(row["seeds"].values())).get("refusal_rate_by_judge") or {}
            cells.append(_fmt(by_judge.get(j)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    note = f"\nSeeds: {results['seeds']}; intervals: 95% bootstrap over prompts (paired for drift)."
    return "\n".join(lines) + "\n" + note + "\n"


__all__ = ["SCHEMA_VERSION", "aggregate", "format_table"]
