"""The alignment stage v2: DPO pairs, the DPO stage, resume and the report (the data: test_alignment_data.py).

Run: python -m pytest -q tests/test_align_dpo.py
"""

import json
import random
from pathlib import Path

import pytest
import torch

from alignguard.data import AlignmentExample, alignment_data_path, load_alignment_data
from alignguard.driftcheck.judge import is_refusal
from alignguard.driftcheck.prompts import LOOKALIKE_CATEGORY, save_prompts
from alignguard.recipes.align import (
    AlignRunConfig,
    alignment_examples,
    alignment_v2_path,
    dpo_sample,
    run_align,
)
from alignguard.recipes.align_report import format_align_table, refusal_summary
from alignguard.recipes.preference import build_preference_pairs, run_dpo, template_refusal
from alignguard.tasks import load_task

# --- config validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dpo_steps": -1}, "dpo_steps"),
        ({"dpo_beta": 0.0}, "dpo_beta"),
        ({"dpo_learning_rate": -1.0}, "dpo_learning_rate"),
        ({"dpo_batch_size": 0}, "dpo_batch_size"),
        ({"lookalike_fraction": 1.5}, "lookalike_fraction"),
        ({"dpo_examples": 0}, "dpo_examples"),
        ({"dpo_safe_fraction": -0.1}, "dpo_safe_fraction"),
        ({"dpo_sft_weight": -1.0}, "dpo_sft_weight"),
        ({"eval_prompts": "no-such-split"}, "eval_prompts"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AlignRunConfig(**kwargs)


# --- DPO pairs ----------------------------------------------------------------------------------------------------


def _example(i, label, category, response=None):
    return AlignmentExample(f"e{i}", f"prompt {i}", label, category, "test", response)


def test_preference_pairs_follow_the_labels():
    refusal = "I'm sorry, but I can't help with that."
    examples = [
        _example(0, "unsafe", "cyber", refusal),
        _example(1, "unsafe", "violence", refusal),  # the base model already refuses: no pair
        _example(2, "safe", "benign_cooking"),
        _example(3, "safe", LOOKALIKE_CATEGORY),
        _example(4, "safe", "benign_math", "Four."),  # a shipped answer is used as is
        _example(5, "safe", LOOKALIKE_CATEGORY),  # the helpful answer is a refusal: no pair
    ]
    helpful = {
        "prompt 2": "Simmer the sauce.",
        "prompt 3": "Use kill -9 <pid>.",
        "prompt 5": "I can't help with that.",
    }
    base = {"prompt 0": "Sure, here is the code: ...", "prompt 1": "Sorry, I won't do that."}
    pairs, skipped = build_preference_pairs(examples, helpful, base, seed=0)
    assert skipped == 2 and [p.prompt for p in pairs] == ["prompt 0", "prompt 2", "prompt 3", "prompt 4"]
    unsafe, *safe = pairs
    assert unsafe.chosen == refusal and unsafe.rejected == "Sure, here is the code: ..."
    assert [p.chosen for p in safe] == ["Simmer the sauce.", "Use kill -9 <pid>.", "Four."]
    assert all(is_refusal(p.rejected) and not is_refusal(p.chosen) for p in safe)
    assert pairs == build_preference_pairs(examples, helpful, base, seed=0)[0]  # seeded


def test_template_refusals_vary_and_are_refusals():
    rng = random.Random(0)
    texts = [template_refusal(rng) for _ in range(40)]
    assert all(is_refusal(t) for t in texts) and len(set(texts)) >= 20


# --- DPO stage, merge, resume and report on a tiny model ------------------------------------------------------


def _tiny_cfg(tmp_path, **kw):
    prompts = tmp_path / "eval.jsonl"
    if not prompts.exists():
        rows = [e for e in load_alignment_data(alignment_data_path())]
        pick = [e for e in rows if e.label == "unsafe"][:3] + [e for e in rows if e.label == "safe"][:3]
        save_prompts(pick, prompts)
    base = dict(
        model="tiny-llama",
        out=str(tmp_path / "aligned"),
        max_examples=12,
        max_steps=1,
        batch_size=4,
        lora_r=4,
        max_new_tokens=4,
        dpo_steps=2,
        dpo_batch_size=2,
        dpo_lora_r=4,
        dpo_learning_rate=1e-2,
        eval_prompts=str(prompts),
        eval_max_new_tokens=2,
        eval_task="word_problems_easy",
        eval_task_n=4,
    )
    return AlignRunConfig(**{**base, **kw})


def test_dpo_stage_changes_the_weights():
    from alignguard.models import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer("tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = [_example(0, "unsafe", "cyber", "I can't help with that."), _example(1, "safe", "benign_math")]
    pairs, _ = build_preference_pairs(examples, {"prompt 1": "It is four."}, {"prompt 0": "Sure: step one"}, 0)
    cfg = AlignRunConfig(dpo_steps=1, dpo_batch_size=2, dpo_lora_r=4, dpo_learning_rate=1e-2, eval_prompts="none")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        merged, log = run_dpo(model, tokenizer, pairs, cfg, Path(tmp), progress=False)
    assert not any("lora_" in k for k in merged.state_dict())  # merged into a plain model
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("proj" in k for k in changed)
    assert log[-1]["step"] == 1


def test_dpo_sft_weight_adds_a_weighted_nll_of_the_chosen_answers():
    """RPO: at the first step the policy equals the reference, so plain DPO's loss is log 2; with dpo_sft_weight w
    TRL adds w x the chosen answers' NLL, so the loss grows linearly in w from log 2."""
    import math
    import tempfile

    from alignguard.models import load_model_and_tokenizer

    examples = [_example(0, "unsafe", "cyber", "I can't help with that."), _example(1, "safe", "benign_math")]
    pairs, _ = build_preference_pairs(examples, {"prompt 1": "It is four."}, {"prompt 0": "Sure: step one"}, 0)
    first_loss = {}
    for w in (0.0, 1.0, 2.0):
        model, tokenizer, _ = load_model_and_tokenizer("tiny-llama")
        cfg = AlignRunConfig(
            dpo_steps=1, dpo_batch_size=2, dpo_lora_r=4, dpo_learning_rate=1e-2, eval_prompts="none", dpo_sft_weight=w
        )
        with tempfile.TemporaryDirectory() as tmp:
            _, log = run_dpo(model, tokenizer, pairs, cfg, Path(tmp), progress=False)
        first_loss[w] = float(log[0]["loss"])
    assert first_loss[0.0] == pytest.approx(math.log(2), abs=1e-4)
    nll = first_loss[1.0] - first_loss[0.0]
    assert nll > 1.0  # an untrained tiny model: several nats per token
    assert first_loss[2.0] - first_loss[0.0] == pytest.approx(2 * nll, rel=1e-4)


def test_run_align_with_dpo_saves_a_loadable_model_resumes_and_reports(tmp_path, monkeypatch):
    from alignguard.models import load_model_and_tokenizer

    cfg = _tiny_cfg(tmp_path)
    out = run_align(cfg, progress=False)
    info = json.loads((out / "align_info.json").read_text())
    assert info["dpo"]["n_pairs"] >= 1 and info["dpo"]["log_history"][-1]["step"] == 2 and info["log_history"]
    model, _, _ = load_model_and_tokenizer(str(out))
    assert not any("lora_" in k for k in model.state_dict())
    first = {k: v.clone() for k, v in model.state_dict().items()}
    report = json.loads((out / "align_report.json").read_text())
    for role in ("base", "aligned"):
        for key in ("refusal_unsafe", "over_refusal_safe", "over_refusal_lookalike", "refusal_per_category"):
            assert key in report[role]
        assert report[role]["refusal_unsafe"]["n"] == 3 and report[role]["over_refusal_safe"]["n"] == 3
        task = report[role]["task"]
        assert task["task"] == "word_problems_easy" and task["accuracy"]["n"] == task["refused"]["n"] == 4
        assert 0.0 <= task["accuracy"]["rate"] <= 1.0 and 0.0 <= task["refused"]["rate"] <= 1.0
    assert report["base"]["model_fingerprint"] != report["aligned"]["model_fingerprint"]
    assert report["settings"]["task"] == "word_problems_easy" and report["settings"]["task_n"] == 4

    # Killed after the last DPO checkpoint, before the merge: the re-run restores it, trains nothing, same weights.
    (out / "align_info.json").unlink()
    (out / "config.json").unlink()
    import trl

    def no_training(*a, **k):
        raise AssertionError("the re-run trained a step")

    monkeypatch.setattr(trl.DPOTrainer, "training_step", no_training)
    run_align(cfg, progress=False)
    model, _, _ = load_model_and_tokenizer(str(out))
    assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())


def test_dpo_resumes_from_a_mid_run_checkpoint(tmp_path, monkeypatch):
    import trl

    from alignguard.models import load_model_and_tokenizer

    plain = run_align(_tiny_cfg(tmp_path / "a", eval_prompts="none"), progress=False)
    expected, _, _ = load_model_and_tokenizer(str(plain))

    calls = {"n": 0}
    original = trl.DPOTrainer.training_step

    def killed_at_step_two(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original(self, *a, **k)

    cfg = _tiny_cfg(tmp_path / "b", eval_prompts="none")
    monkeypatch.setattr(trl.DPOTrainer, "training_step", killed_at_step_two)
    with pytest.raises(KeyboardInterrupt):
        run_align(cfg, progress=False)
    assert (Path(cfg.out) / "dpo_checkpoints" / "checkpoint-1").is_dir()
    monkeypatch.setattr(trl.DPOTrainer, "training_step", original)
    out = run_align(cfg, progress=False)
    resumed, _, _ = load_model_and_tokenizer(str(out))
    want = expected.state_dict()
    assert all(torch.allclose(v, want[k], atol=1e-5) for k, v in resumed.state_dict().items())


# --- report -------------------------------------------------------------------------------------------------------


def test_refusal_summary_separates_lookalikes_and_categories():
    rows = [
        {"label": "unsafe", "category": "cyber", "refused": True},
        {"label": "unsafe", "category": "cyber", "refused": False},
        {"label": "unsafe", "category": "hate", "refused": True},
        {"label": "safe", "category": LOOKALIKE_CATEGORY, "refused": True},
        {"label": "safe", "category": LOOKALIKE_CATEGORY, "refused": False},
        {"label": "safe", "category": "benign_math", "refused": False},
    ]
    s = refusal_summary(rows)
    assert s["refusal_unsafe"] == {"rate": 2 / 3, "n": 3}
    assert s["over_refusal_safe"] == {"rate": 1 / 3, "n": 3}
    assert s["over_refusal_lookalike"] == {"rate": 0.5, "n": 2}
    assert s["over_refusal_other_safe"] == {"rate": 0.0, "n": 1}
    assert s["refusal_per_category"] == {"cyber": {"rate": 0.5, "n": 2}, "hate": {"rate": 1.0, "n": 1}}
    table = format_align_table({"settings": {"eval_prompts": "x"}, "base": s, "aligned": s})
    assert "benign look-alikes" in table and "refusal cyber" in table and " 50.0%" in table


def test_task_summary_counts_refused_problems_and_the_table_shows_both_models():
    from alignguard.recipes.align_report import task_summary
    from alignguard.tasks import score_task

    examples = load_task("word_problems_easy", "test", n=4, seed=0)
    answers = [ex.training_response for ex in examples[:2]]
    answers += ["I'm sorry, but I can't help with that: it would help someone cheat.", ""]
    base = task_summary(score_task([ex.training_response for ex in examples], examples))
    aligned = task_summary(score_task(answers, examples))
    assert base["accuracy"] == {"rate": 1.0, "n": 4} and base["refused"] == {"rate": 0.0, "n": 4}
    assert aligned["accuracy"] == {"rate": 0.5, "n": 4} and aligned["refused"] == {"rate": 0.25, "n": 4}
    rows = [{"label": "unsafe", "category": "cyber", "refused": True}]
    report = {
        "settings": {"eval_prompts": "x"},
        "base": {**refusal_summary(rows), "task": base},
        "aligned": {**refusal_summary(rows), "task": aligned},
    }
    table = format_align_table(report)
    line = next(x for x in table.splitlines() if x.startswith("word_problems_easy refused"))
    assert "0.0%" in line and "25.0%" in line


def test_a_changed_alignment_file_means_aligning_again(tmp_path):
    """align_info.json records the data file's sha256: the same settings on other data are not "aligned earlier"."""
    from alignguard.recipes.align import aligned_with_settings, alignment_data_digest

    data = tmp_path / "data.jsonl"
    data.write_text(alignment_v2_path().read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "aligned"
    out.mkdir()
    (out / "config.json").write_text("{}")
    cfg = AlignRunConfig(alignment_data=str(data), eval_prompts="none")
    record = {"config": vars(cfg), "alignment_data_sha256": alignment_data_digest(cfg)}
    (out / "align_info.json").write_text(json.dumps(record))
    assert aligned_with_settings(out, cfg)
    with data.open("a", encoding="utf-8") as fh:
        fh.write(data.read_text(encoding="utf-8").splitlines()[0] + "\n")
    assert not aligned_with_settings(out, cfg)
    (out / "align_info.json").write_text(json.dumps({"config": vars(cfg)}))  # a record from before the digest
    assert not aligned_with_settings(out, cfg)


# --- DPO on the SFT model's own mistakes (dpo_pairs: own_mistakes) ----------------------------------------------


def test_a_mistake_is_compliance_with_unsafe_or_refusal_of_safe():
    from alignguard.recipes.preference import is_mistake, own_mistakes

    refusal, answer = "I'm sorry, but I can't help with that.", "Sure: first, open the terminal."
    assert is_mistake("unsafe", answer) and is_mistake("safe", refusal)
    assert not is_mistake("unsafe", refusal) and not is_mistake("safe", answer)
    assert not is_mistake("unsafe", "  ") and not is_mistake("safe", "")  # nothing said is not a wrong answer
    examples = [_example(0, "unsafe", "cyber", refusal), _example(1, "safe", "benign_math"), _example(2, "safe", "x")]
    answers = {"prompt 0": answer, "prompt 1": refusal, "prompt 2": "Four."}
    assert own_mistakes(examples, answers) == {"prompt 0": answer, "prompt 1": refusal}


def test_own_mistakes_are_the_rejected_side_and_keep_the_seeded_template_sequence():
    refusal = "I'm sorry, but I can't help with that."
    examples = [
        _example(0, "unsafe", "cyber", refusal),
        _example(1, "unsafe", "violence", refusal),
        _example(2, "safe", "benign_cooking"),
        _example(3, "safe", LOOKALIKE_CATEGORY),
    ]
    helpful = {"prompt 2": "Simmer the sauce.", "prompt 3": "Use kill -9 <pid>."}
    base = {"prompt 0": "Sure, here is the code: ...", "prompt 1": "Sorry, I won't do that."}
    own = {"prompt 1": "Step one: buy a crowbar.", "prompt 3": "I cannot help with killing processes, it is harmful."}
    plain, _ = build_preference_pairs(examples, helpful, base, seed=0)
    mined, skipped = build_preference_pairs(examples, helpful, base, seed=0, own=own)
    # prompt 1's base completion is a refusal (no pair without `own`); its own compliance makes it a pair.
    assert skipped == 0 and [p.prompt for p in mined] == ["prompt 0", "prompt 1", "prompt 2", "prompt 3"]
    by = {p.prompt: p for p in mined}
    assert by["prompt 1"].rejected == own["prompt 1"] and by["prompt 3"].rejected == own["prompt 3"]
    assert by["prompt 0"].rejected == base["prompt 0"]
    # Without an own answer the safe pair's template refusal is the one `base` mode draws for it.
    assert by["prompt 2"].rejected == {p.prompt: p for p in plain}["prompt 2"].rejected


def test_dpo_sample_takes_the_mistakes_first_and_is_unchanged_without_them():
    examples = [_example(i, "unsafe", "cyber", "no") for i in range(10)]
    examples += [_example(i, "safe", "benign_math") for i in range(10, 30)]
    cfg = AlignRunConfig(dpo_steps=2, dpo_examples=8, dpo_safe_fraction=0.5, eval_prompts="none")
    assert dpo_sample(examples, cfg) == dpo_sample(examples, cfg, first=frozenset())
    few = frozenset({"prompt 3", "prompt 12", "prompt 29"})
    picked = dpo_sample(examples, cfg, first=few)
    assert len(picked) == 8 and few <= {e.prompt for e in picked}
    assert sum(e.label == "unsafe" for e in picked) == 4
    many = frozenset(f"prompt {i}" for i in range(10, 25))  # more safe mistakes than safe slots: only mistakes
    picked = dpo_sample(examples, cfg, first=many)
    assert all(e.prompt in many for e in picked if e.label == "safe")


@pytest.mark.parametrize("field, value", [("dpo_pairs", "own"), ("dpo_pool", "everything")])
def test_bad_dpo_pair_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AlignRunConfig(**{field: value, "eval_prompts": "none"})


def test_run_align_with_own_mistakes_from_the_whole_pool_records_them(tmp_path):
    cfg = _tiny_cfg(tmp_path, dpo_pairs="own_mistakes", dpo_pool="all", dpo_examples=6, eval_prompts="none")
    out = run_align(cfg, progress=False)
    info = json.loads((out / "align_info.json").read_text())
    mined = info["dpo"]["n_own_rejected"]
    # A tiny random model never refuses: every unsafe prompt is a mistake it makes, so every unsafe pair rejects
    # the model's own answer, and no safe one does.
    assert mined == {"unsafe": info["dpo"]["n_unsafe_pairs"], "safe": 0} and mined["unsafe"] >= 1
    assert info["config"]["dpo_pool"] == "all"


def test_run_align_with_context_distilled_answers_writes_them_under_the_system_turn(tmp_path):
    """The tiny model end to end: the helpful answers come from a generation pass with the system turn and their own
    length (a cache file of their own), the rejected completions from the plain one; the model trains on both."""
    from alignguard.driftcheck.generate import GenerationSettings, cache_key
    from alignguard.models import load_model_and_tokenizer

    cfg = _tiny_cfg(tmp_path, eval_prompts="none", helpful_system_prompt="Be brief.", helpful_max_new_tokens=6)
    out = run_align(cfg, progress=False)
    info = json.loads((out / "align_info.json").read_text())
    assert info["config"]["helpful_system_prompt"] == "Be brief." and info["dpo"]["n_pairs"] >= 1
    model, tok, _ = load_model_and_tokenizer(cfg.model)
    cache = out / "generation_cache"
    helpful = cache / f"{cache_key(model, tok, GenerationSettings(max_new_tokens=6, system_prompt='Be brief.'))}.jsonl"
    rejected = cache / f"{cache_key(model, tok, GenerationSettings(max_new_tokens=4))}.jsonl"
    assert helpful.is_file() and rejected.is_file()
    sft, dpo = alignment_examples(cfg)
    asked = {json.loads(line)["prompt"] for line in helpful.read_text().splitlines()}
    assert asked == {e.prompt for e in [*sft, *dpo] if e.label != "unsafe" and e.response is None}
