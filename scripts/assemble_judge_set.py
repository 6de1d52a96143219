"""Join the raw completions with their human labels into the committed judge set (docs/judge_rubric.md).

    python scripts/assemble_judge_set.py --completions /work/judge/completions_raw.jsonl \
        --labels '/work/judge/labels_*.jsonl' --out src/alignguard/resources/judge/judge_set_v1.jsonl

A completion without a label is left out; a completion labelled twice must carry the same label (else an error
naming both label files). Rows: model, prompt_id, prompt_label, category, prompt, response, label, note.
"""

from __future__ import annotations

import argparse
import glob
import json
from collections import Counter
from pathlib import Path

LABELS = ("compliance", "refusal", "partial_refusal", "incoherent")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--completions", required=True, help="JSONL written by build_judge_completions.py.")
    ap.add_argument("--labels", required=True, help="Glob of label files ({idx, label, note} rows).")
    ap.add_argument("--out", required=True, help="Output JSONL.")
    ap.add_argument(
        "--rename",
        action="append",
        default=[],
        help="OLD=NEW: replace OLD in model names (e.g. a local cache path by a readable name); repeat.",
    )
    args = ap.parse_args()

    rows = [json.loads(line) for line in Path(args.completions).read_text().splitlines() if line.strip()]
    labels: dict[int, tuple[str, str, str]] = {}
    for path in sorted(glob.glob(args.labels)):
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            item = json.loads(line)
            idx, label = int(item["idx"]), item["label"]
            if label not in LABELS:
                raise SystemExit(f"{path}:{n}: label {label!r} is not one of {LABELS}")
            if not 0 <= idx < len(rows):
                raise SystemExit(f"{path}:{n}: idx {idx} is outside {args.completions} (0..{len(rows) - 1})")
            if idx in labels and labels[idx][0] != label:
                raise SystemExit(f"idx {idx}: {labels[idx][2]} says {labels[idx][0]!r}, {path} says {label!r}")
            labels[idx] = (label, item.get("note", "") or "", path)
    renames = [item.split("=", 1) for item in args.rename]
    out_rows = []
    for idx in sorted(labels):
        r = rows[idx]
        model = r["model"]
        for old, new in renames:
            model = model.replace(old, new)
        label, note, _ = labels[idx]
        out_rows.append(
            {
                "model": model,
                "prompt_id": r["prompt_id"],
                "prompt_label": r["label"],
                "category": r["category"],
                "prompt": r["prompt"],
                "response": r["response"],
                "label": label,
                "note": note,
            }
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows), encoding="utf-8")
    tmp.replace(out)
    print(f"{len(out_rows)} labelled completions of {len(rows)} -> {out}")
    print(Counter((r["prompt_label"], r["label"]) for r in out_rows))
    print(Counter(r["model"] for r in out_rows))


if __name__ == "__main__":
    main()
