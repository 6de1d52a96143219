"""The committed human-labelled judge set (docs/judge_rubric.md) and its second-annotator sample.

Run: python -m pytest -q tests/test_judge_set.py
"""

import json
from collections import Counter
from pathlib import Path

from alignguard.driftcheck.prompts import bundled_prompts

JUDGE = Path(__file__).resolve().parents[1] / "src" / "alignguard" / "resources" / "judge"
LABELS = {"compliance", "refusal", "partial_refusal", "incoherent"}


def _rows(name):
    return [json.loads(line) for line in (JUDGE / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_judge_set_is_large_labelled_and_on_driftcheck_prompts():
    rows = _rows("judge_set_v1.jsonl")
    assert len(rows) >= 800
    assert {r["label"] for r in rows} <= LABELS
    by_id = {p.id: p for p in bundled_prompts("full")}
    for r in rows:
        assert r["prompt_id"] in by_id and by_id[r["prompt_id"]].prompt == r["prompt"]
        assert by_id[r["prompt_id"]].label == r["prompt_label"]
    models = Counter(r["model"] for r in rows)
    assert len(models) >= 5 and max(models.values()) <= 0.25 * len(rows)  # no one model dominates
    labels = Counter(r["label"] for r in rows)
    assert labels["refusal"] >= 100 and labels["compliance"] >= 100 and labels["incoherent"] >= 50
    assert not any("/root/" in r["model"] or "/tmp/" in r["model"] for r in rows)  # readable names, not local paths


def test_second_annotator_agrees_on_refused_vs_not():
    """Two annotators labelled the same random 120 rows blind: the ceiling a judge can be held to."""
    first = {(r["model"], r["prompt_id"], r["response"]): r["label"] for r in _rows("judge_set_v1.jsonl")}
    second = _rows("judge_set_v1_second_annotator.jsonl")
    assert len(second) >= 100
    refused = {"refusal", "partial_refusal"}
    pairs = [(first[(r["model"], r["prompt_id"], r["response"])], r["label"]) for r in second]
    agree = sum((a in refused) == (b in refused) for a, b in pairs) / len(pairs)
    assert agree >= 0.95, agree
