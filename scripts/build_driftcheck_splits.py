"""Draw the DriftCheck standard, demo and calibration splits from the bundled set, deterministically.

Run (from the repository root):

    python scripts/build_driftcheck_splits.py            # rewrite the split files and their README block
    python scripts/build_driftcheck_splits.py --check    # exit 1 if the committed split files differ from a rebuild

The only input is `resources/driftcheck/driftcheck_v1.jsonl` (no package is read). Outputs, next to it:

- `driftcheck_standard.jsonl`: the evaluation split of compare runs. 40 unsafe prompts per harm category (all 8)
  and 320 safe ones: 160 benign look-alikes and 160 ordinary prompts spread over the `benign_*` topics.
- `driftcheck_demo.jsonl`: a stratified subset of the standard split for the demo: 20 unsafe per category and
  80 safe (40 look-alikes, 40 spread over the topics).
- `driftcheck_calibration.jsonl`: 120 unsafe (15 per category) and 120 safe (50 look-alikes) drawn from what the
  standard split leaves, for choosing lambda without touching the evaluation prompts. It shares no id with the
  standard split and no near-duplicate (the rule of `build_driftcheck_data.py`: a shared 8-word sequence or
  >= 60% shared content words): every near-duplicate cluster of a standard prompt is left out of it.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from build_driftcheck_data import cluster  # noqa: E402  (the near-duplicate rule of the data build)

from alignguard.driftcheck.prompts import (  # noqa: E402
    LOOKALIKE_CATEGORY,
    UNSAFE_CATEGORIES,
    PromptRecord,
    load_prompts,
    save_prompts,
)

DRIFT_DIR = ROOT / "src" / "alignguard" / "resources" / "driftcheck"
SOURCE_FILE = "driftcheck_v1.jsonl"
FILES = {
    "standard": "driftcheck_standard.jsonl",
    "demo": "driftcheck_demo.jsonl",
    "calibration": "driftcheck_calibration.jsonl",
}
SEED = 20261201
# Rows per split: unsafe per harm category, look-alikes, and other safe prompts (spread over the benign_* topics).
SIZES = {
    "standard": {"unsafe_per_category": 40, "lookalike": 160, "safe_other": 160},
    "demo": {"unsafe_per_category": 20, "lookalike": 40, "safe_other": 40},
    "calibration": {"unsafe_per_category": 15, "lookalike": 50, "safe_other": 70},
}
# The standard split takes at most this share of each ordinary topic, so the calibration split keeps every topic.
STANDARD_TOPIC_SHARE = 2 / 3


def _rng(split: str, group: str) -> random.Random:
    return random.Random(f"driftcheck-splits-{SEED}-{split}-{group}")


def _spread(groups: dict[str, list[PromptRecord]], n: int, caps: dict[str, int] | None = None) -> list[PromptRecord]:
    """`n` records taken round-robin over the groups (sorted by name; each already shuffled), so every group gets
    an equal share until it runs out or reaches its cap."""
    taken: dict[str, int] = Counter()
    out: list[PromptRecord] = []
    names = sorted(groups)
    while len(out) < n:
        progressed = False
        for name in names:
            limit = min(len(groups[name]), (caps or {}).get(name, len(groups[name])))
            if len(out) < n and taken[name] < limit:
                out.append(groups[name][taken[name]])
                taken[name] += 1
                progressed = True
        if not progressed:
            raise ValueError(f"asked for {n} records, but the groups {names} hold only {len(out)} within their caps")
    return out


def _draw(records: list[PromptRecord], split: str, caps: dict[str, int] | None = None) -> list[PromptRecord]:
    """The rows of `split` (sizes in SIZES) drawn from `records`, each category sampled with its own seeded RNG."""
    size = SIZES[split]
    by_cat: dict[str, list[PromptRecord]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.id):
        by_cat[r.category].append(r)
    for cat, rows in by_cat.items():
        _rng(split, cat).shuffle(rows)
    out: list[PromptRecord] = []
    for cat in UNSAFE_CATEGORIES:
        if len(by_cat[cat]) < size["unsafe_per_category"]:
            raise ValueError(f"{split}: {cat} has {len(by_cat[cat])} prompts, {size['unsafe_per_category']} needed")
        out += by_cat[cat][: size["unsafe_per_category"]]
    if len(by_cat[LOOKALIKE_CATEGORY]) < size["lookalike"]:
        raise ValueError(f"{split}: {len(by_cat[LOOKALIKE_CATEGORY])} look-alikes, {size['lookalike']} needed")
    out += by_cat[LOOKALIKE_CATEGORY][: size["lookalike"]]
    topics = {c: rows for c, rows in by_cat.items() if c.startswith("benign_") and c != LOOKALIKE_CATEGORY}
    out += _spread(topics, size["safe_other"], caps)
    return sorted(out, key=lambda r: (r.label == "safe", r.category, r.source, r.id))


def build(full: list[PromptRecord]) -> dict[str, list[PromptRecord]]:
    """The three splits of the bundled set `full`."""
    topic_counts = Counter(r.category for r in full if r.label == "safe" and r.category != LOOKALIKE_CATEGORY)
    caps = {c: int(n * STANDARD_TOPIC_SHARE) for c, n in topic_counts.items()}
    standard = _draw(full, "standard", caps)
    demo = _draw(standard, "demo")
    # Calibration: what the standard split leaves, minus every near-duplicate cluster that has a standard member
    # (clusters are transitive, so this also drops prompts that are only near-duplicates of near-duplicates).
    cid = cluster([{"prompt": r.prompt} for r in full])
    standard_ids = {r.id for r in standard}
    taken_clusters = {c for r, c in zip(full, cid) if r.id in standard_ids}
    rest = [r for r, c in zip(full, cid) if c not in taken_clusters]
    calibration = _draw(rest, "calibration")
    return {"standard": standard, "demo": demo, "calibration": calibration}


def write(splits: dict[str, list[PromptRecord]], folder: Path) -> None:
    for name, records in splits.items():
        save_prompts(records, folder / FILES[name])


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(splits: dict[str, list[PromptRecord]], folder: Path) -> str:
    lines = [f"Drawn from `{SOURCE_FILE}` with seed {SEED}.", ""]
    lines += ["| file | rows | unsafe | safe | look-alikes | sha256 |", "|---|---|---|---|---|---|"]
    for name, records in splits.items():
        n_u = sum(r.label == "unsafe" for r in records)
        n_l = sum(r.category == LOOKALIKE_CATEGORY for r in records)
        digest = sha256_file(folder / FILES[name])
        lines.append(f"| `{FILES[name]}` | {len(records)} | {n_u} | {len(records) - n_u} | {n_l} | `{digest}` |")
    lines += ["", "Rows per category (standard / demo / calibration):", ""]
    counts = {k: Counter(r.category for r in v) for k, v in splits.items()}
    for cat in sorted(set().union(*counts.values())):
        lines.append(f"- `{cat}`: {counts['standard'][cat]} / {counts['demo'][cat]} / {counts['calibration'][cat]}")
    return "\n".join(lines)


BEGIN, END = "<!-- BEGIN GENERATED: build_driftcheck_splits.py -->", "<!-- END GENERATED: splits -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the committed split files match a rebuild")
    args = parser.parse_args(argv)
    splits = build(load_prompts(DRIFT_DIR / SOURCE_FILE))
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write(splits, Path(tmp))
            bad = [
                f
                for f in FILES.values()
                if not (DRIFT_DIR / f).is_file() or sha256_file(Path(tmp) / f) != sha256_file(DRIFT_DIR / f)
            ]
        print("stale: " + ", ".join(bad) if bad else "committed splits match a rebuild")
        return 1 if bad else 0
    write(splits, DRIFT_DIR)
    readme = DRIFT_DIR / "README.md"
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    block = summary(splits, DRIFT_DIR)
    tmp_readme = readme.with_suffix(".md.tmp")
    tmp_readme.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}", encoding="utf-8")
    tmp_readme.replace(readme)
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
