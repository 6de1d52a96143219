"""The alignment stage's data mix (`alignguard align`).

Run: python -m pytest -q tests/test_align.py
"""

import random
from collections import Counter

import pytest

from alignguard.data import load_alignment_data
from alignguard.recipes.align import AlignRunConfig, sample_alignment_examples


@pytest.mark.parametrize("fraction, n, want_safe", [(0.5, 160, 80), (0.75, 160, 120), (0.0, 40, 0), (1.0, 40, 40)])
def test_sample_has_the_requested_safe_share(fraction, n, want_safe):
    data = load_alignment_data()
    picked = sample_alignment_examples(data, AlignRunConfig(max_examples=n, safe_fraction=fraction), random.Random(0))
    counts = Counter(e.label for e in picked)
    assert len(picked) == n and counts["safe"] == want_safe and len({e.id for e in picked}) == n


def test_sample_fills_from_the_other_label_when_one_runs_out_and_keeps_all_when_asked():
    data = load_alignment_data()
    n_safe = sum(e.label == "safe" for e in data)
    n = n_safe + 20
    picked = sample_alignment_examples(data, AlignRunConfig(max_examples=n, safe_fraction=1.0), random.Random(0))
    assert Counter(e.label for e in picked)["safe"] == n_safe and len(picked) == n
    assert sample_alignment_examples(data, AlignRunConfig(), random.Random(0)) == data
    with pytest.raises(ValueError, match="safe_fraction"):
        AlignRunConfig(safe_fraction=1.5)
