"""A fresh held-out test set for the refusal judges: sample completions the judges never saw, then score the judges.

Issue 11 asks for a judge that agrees with humans on completions that are not in the judge's training set. The judge
set v1 (1000 rows, 48 new tokens) trained the `learned` head and was read while writing the pattern rules, so its
cross-validated numbers are optimistic for `pattern` at least. This script builds a second set from DriftCheck runs
made later, at the 32 new tokens DriftCheck actually judges, and scores the shipped judges on it, unchanged.

The protocol is fixed before any row is labelled: the rows are a seeded, stratified sample; the annotators see only
prompt and response (no judge flags); the target is refused = refusal or partial_refusal (docs/judge_rubric.md);
every judge named by `--judges` is scored once, with a Wilson 95% interval, against each annotator and on the rows
where the annotators agree. Nothing is tuned on the result.

    # 1. sample: every `generations.jsonl` given as SOURCE=PATH (a DriftCheck output folder's file)
    python scripts/heldout_judge_set.py sample --out DIR --n 320 \\
        --inputs aligned=runs/smollm2-aligned/report/aligned/generations.jsonl probe_l1=...
    # 2. label DIR/rows.jsonl by reading (label + note per row) into LABELS.jsonl, one file per annotator
    # 3. score
    python scripts/heldout_judge_set.py score --data DIR/labels_a.jsonl --second DIR/labels_b.jsonl \\
        --judges pattern pattern_relevance learned --out DIR/judge_scores.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

from alignguard.driftcheck.learned_judge import LABELS, REFUSED_LABELS
from alignguard.io import atomic_write_json, atomic_write_text

# What an annotator sees of a row: no judge flags, no source model (labels describe the response, not who wrote it).
SHOWN = ("row_id", "prompt_label", "category", "prompt", "response")
V1 = Path(__file__).resolve().parent.parent / "src" / "alignguard" / "resources" / "judge" / "judge_set_v1.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SystemExit(f"error: {path}: {exc}") from exc
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"error: {path}:{i}: not JSON ({exc})") from exc
    return rows


def _key(prompt: str, response: str) -> tuple[str, str]:
    return prompt.strip().lower(), response.strip().lower()


def sample(inputs: dict[str, Path], n: int, seed: int, exclude: list[Path]) -> list[dict]:
    """`n` rows, as equal a share per source as the sources allow and, within a source, per prompt label; rows whose
    (prompt, response) is in an `exclude` file, or already drawn, are skipped."""
    seen = {_key(r["prompt"], r["response"]) for path in exclude for r in read_jsonl(path)}
    pools = {}
    for source, path in inputs.items():
        rows = read_jsonl(path)
        for i, r in enumerate(rows, 1):
            if not {"prompt", "response", "label"} <= set(r):
                raise SystemExit(
                    f"error: {path}:{i}: needs prompt, response and label (a DriftCheck generations.jsonl)"
                )
        for label in ("unsafe", "safe"):
            pool = [r for r in rows if r["label"] == label]
            random.Random(f"{seed}:{source}:{label}").shuffle(pool)
            pools[(source, label)] = pool
    picked, order = [], sorted(pools)
    while len(picked) < n and any(pools.values()):
        for stratum in order:  # round robin: each stratum gives one row per turn while it has any left
            pool = pools[stratum]
            while pool:
                r = pool.pop()
                key = _key(r["prompt"], r["response"])
                if key not in seen:
                    seen.add(key)
                    picked.append((stratum[0], r))
                    break
            if len(picked) == n:
                break
    random.Random(seed).shuffle(picked)  # annotators should not read one source in a block
    return [
        {
            "row_id": f"h{i:04d}",
            "source": source,
            "prompt_id": r.get("id", ""),
            "prompt_label": r["label"],
            "category": r.get("category", ""),
            "prompt": r["prompt"],
            "response": r["response"],
        }
        for i, (source, r) in enumerate(picked)
    ]


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def read_labels(path: Path, rows: dict[str, dict]) -> dict[str, str]:
    labels = {}
    for i, r in enumerate(read_jsonl(path), 1):
        rid, label = r.get("row_id"), r.get("label")
        if rid not in rows:
            raise SystemExit(f"error: {path}:{i}: row_id {rid!r} is not in the sampled rows")
        if label not in LABELS:
            raise SystemExit(f"error: {path}:{i}: label {label!r} is not one of {list(LABELS)} (docs/judge_rubric.md)")
        labels[rid] = label
    missing = sorted(set(rows) - set(labels))
    if missing:
        raise SystemExit(f"error: {path}: {len(missing)} sampled rows have no label (e.g. {missing[:3]})")
    return labels


def agreement(pred: dict[str, bool], gold: dict[str, bool], ids: list[str]) -> dict:
    k = sum(pred[i] == gold[i] for i in ids)
    low, high = wilson(k, len(ids))
    return {
        "n": len(ids),
        "agreement": k / len(ids) if ids else None,
        "ci95": [low, high],
        "false_refused": sum(pred[i] and not gold[i] for i in ids),
        "missed_refused": sum(gold[i] and not pred[i] for i in ids),
    }


def score(rows: list[dict], first: dict[str, str], second: dict[str, str] | None, judges: list[str]) -> dict:
    from alignguard.driftcheck.judge import get_judge

    ids = [r["row_id"] for r in rows]
    gold_a = {i: first[i] in REFUSED_LABELS for i in ids}
    report = {"n_rows": len(ids), "labels_first": {lab: sum(v == lab for v in first.values()) for lab in LABELS}}
    targets = {"first annotator": (gold_a, ids)}
    if second is not None:
        gold_b = {i: second[i] in REFUSED_LABELS for i in ids}
        both = [i for i in ids if gold_a[i] == gold_b[i]]
        report["annotators"] = {
            "refused_agreement": agreement(gold_b, gold_a, ids),
            "four_label_agreement": sum(first[i] == second[i] for i in ids) / len(ids),
        }
        targets["second annotator"] = (gold_b, ids)
        targets["both annotators agree"] = (gold_a, both)
    report["judges"] = {}
    for judge in judges:
        name = judge if isinstance(judge, str) else getattr(judge, "__name__", repr(judge))
        flags = get_judge(judge)([r["prompt"] for r in rows], [r["response"] for r in rows])
        pred = dict(zip(ids, map(bool, flags)))
        report["judges"][name] = {t: agreement(pred, gold, sub) for t, (gold, sub) in targets.items()}
        by_label = {}
        for r in rows:
            if r["prompt_label"] in ("unsafe", "safe"):
                by_label.setdefault(r["prompt_label"], []).append(r["row_id"])
        report["judges"][name]["by prompt label (first annotator)"] = {
            lab: agreement(pred, gold_a, sub) for lab, sub in by_label.items()
        }
    return report


def format_table(report: dict) -> str:
    targets = list(next(iter(report["judges"].values())))
    lines = ["| judge | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for name, res in report["judges"].items():
        cells = []
        for t in targets:
            value = res[t]
            if "agreement" in value:
                cells.append(_cell(value))
            else:
                cells.append(", ".join(f"{lab} {_cell(v)}" for lab, v in value.items()))
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    if "annotators" in report:
        a = report["annotators"]
        lines.append(
            f"\nAnnotators agree on refused-vs-not for {_cell(a['refused_agreement'])} of rows "
            f"({100 * a['four_label_agreement']:.1f}% on all four labels)."
        )
    return "\n".join(lines) + "\n"


def _cell(v: dict) -> str:
    low, high = v["ci95"]
    return f"{100 * v['agreement']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] (n={v['n']})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("sample", help="Draw the rows to label from DriftCheck generations.jsonl files.")
    sp.add_argument("--inputs", nargs="+", required=True, help="SOURCE=PATH of each generations.jsonl.")
    sp.add_argument("--out", required=True, help="Folder for rows.jsonl (full) and to_label.jsonl (what is shown).")
    sp.add_argument("--n", type=int, default=320, help="Rows to draw.")
    sp.add_argument("--seed", type=int, default=0, help="Seed of the draw.")
    sp.add_argument("--exclude", nargs="*", default=[str(V1)], help="Labelled sets whose rows are not drawn again.")
    sc = sub.add_parser("score", help="Score judges against one or two annotators' labels.")
    sc.add_argument("--rows", required=True, help="rows.jsonl written by `sample`.")
    sc.add_argument("--data", required=True, help="First annotator's labels: JSONL of {row_id, label, note}.")
    sc.add_argument("--second", default=None, help="Second annotator's labels (optional).")
    sc.add_argument("--judges", nargs="+", default=["pattern", "pattern_relevance", "learned"], help="Judges.")
    sc.add_argument("--out", required=True, help="JSON report path (a .md table is written beside it).")
    args = ap.parse_args(argv)
    if args.cmd == "sample":
        inputs = {}
        for item in args.inputs:
            source, sep, path = item.partition("=")
            if not sep or not source or not path:
                raise SystemExit(f"error: --inputs: expected SOURCE=PATH, got {item!r}")
            inputs[source] = Path(path)
        if args.n < 1:
            raise SystemExit(f"error: --n: must be >= 1, got {args.n}")
        rows = sample(inputs, args.n, args.seed, [Path(p) for p in args.exclude])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "rows.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        shown = "".join(json.dumps({k: r[k] for k in SHOWN}, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(out / "to_label.jsonl", shown)
        counts = {s: sum(r["source"] == s for r in rows) for s in inputs}
        print(f"{len(rows)} rows to {out}/to_label.jsonl; per source {counts}")
        return 0
    rows = read_jsonl(Path(args.rows))
    by_id = {r["row_id"]: r for r in rows}
    first = read_labels(Path(args.data), by_id)
    second = read_labels(Path(args.second), by_id) if args.second else None
    report = score(rows, first, second, args.judges)
    out = Path(args.out)
    atomic_write_json(out, report)
    table = format_table(report)
    atomic_write_text(out.with_suffix(".md"), table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
