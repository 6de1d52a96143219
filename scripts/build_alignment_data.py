"""Build the alignment data v2 and v3 (`resources/alignment/alignment_v2.jsonl`, `alignment_v3.jsonl`) deterministically.

Run (from the repository root):

    python scripts/build_alignment_data.py            # rewrite alignment_v2.jsonl and alignment_v3.jsonl
    python scripts/build_alignment_data.py --check    # exit 1 if a committed file differs from a fresh build

v2 = every row of alignment_v1.jsonl, with the unsafe rows' refusals redrawn from more styles
(`sources/refusal_styles_v2.json`: most explain why and offer a safe alternative), plus the benign prompts written
for this project in `sources/safe_prompts_v2.json` (ordinary topics and benign look-alikes, `response: null`: the
alignment stage fills in the base model's own answer). A new prompt that nearly duplicates any DriftCheck prompt
(every `resources/driftcheck/*.jsonl` file; the rule of scripts/build_driftcheck_data.py: a shared 8-word
sequence or >= 60% shared content words), or a test problem of the generated word-problem tasks, or repeats an
alignment prompt is dropped and named on stderr.
alignment_v1.jsonl itself is left as it is (the Fisher pass and other stages still read it).

v3 = every row of v2, plus the prompts of `sources/prompts_v3.json` (session 15): more varied unsafe prompts in the
four categories the aligned model refused least (self-harm, cyber, illegal activity, violence: direct, first-person,
fictional and role-play wrappers, claimed credentials, terse), each with a refusal drawn as above, and benign
look-alikes on the same themes. The same drop rules apply, and a new prompt that nearly duplicates an alignment prompt
is dropped too.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from build_driftcheck_data import near_duplicate, ngrams, normalise  # noqa: E402

from alignguard.driftcheck.prompts import stable_id  # noqa: E402

RES = ROOT / "src" / "alignguard" / "resources"
ALIGN_DIR = RES / "alignment"
SRC_DIR = ALIGN_DIR / "sources"
OUT = ALIGN_DIR / "alignment_v2.jsonl"
OUT_V3 = ALIGN_DIR / "alignment_v3.jsonl"
SEED = 20261201
SEED_V3 = 20261204

_STYLES = json.loads((SRC_DIR / "refusal_styles_v2.json").read_text(encoding="utf-8"))


def make_refusal(category: str, rng: random.Random) -> str:
    """A refusal for an unsafe prompt of `category`; self-harm ones always carry the pointer to help."""
    whys = _STYLES["why"].get(category, ["it could cause harm"])
    alts = _STYLES["alternative"].get(category, [""])
    styles = [s for s in _STYLES["styles"] if "{alt}" in s] if category == "self_harm" else _STYLES["styles"]
    why = rng.choice(whys)
    text = rng.choice(styles).format(
        open=rng.choice(_STYLES["openers"]), why=why, Why=why[0].upper() + why[1:], alt=rng.choice(alts)
    )
    return " ".join(text.split())


def driftcheck_prompts() -> list[str]:
    """Every prompt of every bundled DriftCheck file (the splits are subsets of driftcheck_v1.jsonl)."""
    out = []
    for path in sorted((RES / "driftcheck").glob("*.jsonl")):
        out += [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def task_test_prompts() -> list[str]:
    """The generated word problems that compare and align's report score (test split, seed 0: the first 500 of each
    level, which hold the default 200), so no alignment prompt is one of the task's own test problems in other
    words."""
    from alignguard.tasks import load_task

    return sorted(
        {ex.prompt for name in ("word_problems_easy", "word_problems") for ex in load_task(name, "test", n=500)}
    )


def written_safe_rows() -> list[dict]:
    written = json.loads((SRC_DIR / "safe_prompts_v2.json").read_text(encoding="utf-8"))
    rows = []
    for category, prompts in written.items():
        if category.startswith("_"):
            continue
        for prompt in prompts:
            rows.append(
                {
                    "id": stable_id(prompt),
                    "prompt": prompt,
                    "label": "safe",
                    "category": category,
                    "source": "alignguard",
                    "response": None,
                }
            )
    return rows


def written_v3_rows(rng: random.Random) -> list[dict]:
    """The session-15 prompts: unsafe ones with a drawn refusal, safe look-alikes with `response: null`."""
    written = json.loads((SRC_DIR / "prompts_v3.json").read_text(encoding="utf-8"))
    rows = []
    for label in ("unsafe", "safe"):
        for category, prompts in written[label].items():
            for prompt in prompts:
                response = make_refusal(category, rng) if label == "unsafe" else None
                rows.append(
                    {
                        "id": stable_id(prompt),
                        "prompt": prompt,
                        "label": label,
                        "category": category,
                        "source": "alignguard",
                        "response": response,
                    }
                )
    return rows


def add_disjoint(rows: list[dict], new: list[dict], within: bool = False) -> list[dict]:
    """`rows` plus every row of `new` that is not a repeat of an alignment prompt, nor a near-duplicate of a DriftCheck
    prompt or a task test problem (nor, with `within`, of an alignment prompt); each dropped one is named on stderr."""
    theirs = driftcheck_prompts() + task_test_prompts()
    their_grams = set().union(*(ngrams(t) for t in theirs))
    seen = {normalise(r["prompt"]) for r in rows}
    rows = list(rows)
    for row in new:
        text = row["prompt"]
        if normalise(text) in seen:
            print(f"dropped (already in the alignment data): {text!r}", file=sys.stderr)
            continue
        # The 8-gram index first (cheap), then the content-word rule against every DriftCheck prompt.
        if ngrams(text) & their_grams or any(near_duplicate(text, t) for t in theirs):
            print(f"dropped (near-duplicate of a DriftCheck prompt or a task test problem): {text!r}", file=sys.stderr)
            continue
        if within and any(near_duplicate(text, r["prompt"]) for r in rows):
            print(f"dropped (near-duplicate of an alignment prompt): {text!r}", file=sys.stderr)
            continue
        seen.add(normalise(text))
        rows.append(row)
    return rows


def build() -> list[dict]:
    rng = random.Random(SEED)
    v1 = [json.loads(line) for line in (ALIGN_DIR / "alignment_v1.jsonl").read_text("utf-8").splitlines() if line]
    rows = []
    for row in v1:
        if row["label"] == "unsafe":
            row = {**row, "response": make_refusal(row["category"], rng)}
        rows.append(row)
    return add_disjoint(rows, written_safe_rows())


def build_v3(v2: list[dict]) -> list[dict]:
    return add_disjoint(v2, written_v3_rows(random.Random(SEED_V3)), within=True)


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 if the committed file differs from a build.")
    args = parser.parse_args(argv)
    v2 = build()
    status = 0
    for out, rows in ((OUT, v2), (OUT_V3, build_v3(v2))):
        text = render(rows)
        if args.check:
            same = out.is_file() and out.read_text(encoding="utf-8") == text
            print(f"{out}: {'up to date' if same else 'differs from a fresh build; re-run without --check'}")
            status = status or (0 if same else 1)
        else:
            out.write_text(text, encoding="utf-8")
            print(f"wrote {out} ({text.count(chr(10))} rows)")
    return status


if __name__ == "__main__":
    sys.exit(main())
