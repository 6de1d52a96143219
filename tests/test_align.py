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


# --- self-distillation settings -----------------------------------------------------------------------------------


def _record_generations(monkeypatch):
    """Replace generation by a recorder: each call's (prompts, settings); every answer names its call."""
    import alignguard.driftcheck.generate as generate

    calls = []

    def fake(model, tokenizer, prompts, settings, cache_dir=None, progress=True):
        calls.append((list(prompts), settings))
        return [f"answer {len(calls)}" for _ in prompts]

    monkeypatch.setattr(generate, "generate_responses", fake)
    return calls


def _examples():
    from alignguard.data import AlignmentExample

    safe = [AlignmentExample(f"s{i}", f"safe {i}", "safe", "benign_general", "test", None) for i in range(3)]
    shipped = AlignmentExample("s9", "safe shipped", "safe", "benign_general", "test", "a shipped answer")
    unsafe = [AlignmentExample(f"u{i}", f"unsafe {i}", "unsafe", "cyber", "test", "No.") for i in range(2)]
    return [*safe, shipped, *unsafe], [safe[0], safe[2], shipped, *unsafe]


def test_helpful_answers_are_distilled_under_their_system_turn_and_rejected_ones_without(monkeypatch):
    from alignguard.recipes.align import base_generations

    calls = _record_generations(monkeypatch)
    sft, dpo = _examples()
    cfg = AlignRunConfig(
        max_new_tokens=12, helpful_max_new_tokens=30, helpful_system_prompt="Be brief.", eval_prompts="none"
    )
    answers = base_generations(None, None, cfg, sft, dpo, progress=False)
    (helpful, h_set), (rejected, r_set) = calls
    assert helpful == ["safe 0", "safe 1", "safe 2"] and (h_set.system_prompt, h_set.max_new_tokens) == (
        "Be brief.",
        30,
    )
    assert rejected == ["unsafe 0", "unsafe 1"] and (r_set.system_prompt, r_set.max_new_tokens) == (None, 12)
    assert answers["safe 1"] == "answer 1" and answers["unsafe 1"] == "answer 2" and "safe shipped" not in answers


def test_without_a_helpful_setting_every_answer_comes_from_one_pass_in_the_old_order(monkeypatch):
    from alignguard.recipes.align import base_generations

    calls = _record_generations(monkeypatch)
    sft, dpo = _examples()
    base_generations(None, None, AlignRunConfig(max_new_tokens=12, eval_prompts="none"), sft, dpo, progress=False)
    assert len(calls) == 1 and calls[0][1].system_prompt is None and calls[0][1].max_new_tokens == 12
    # sft's safe prompts, then dpo's unsafe ones, then dpo's safe ones not yet asked: the order the cache was built in
    assert calls[0][0] == ["safe 0", "safe 1", "safe 2", "unsafe 0", "unsafe 1"]


def test_a_bad_helpful_length_names_the_field():
    with pytest.raises(ValueError, match="helpful_max_new_tokens"):
        AlignRunConfig(helpful_max_new_tokens=0, eval_prompts="none")
