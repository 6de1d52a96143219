"""Self-screened fine-tuning data (`alignguard.self_screen`, the `self_screen` compare row): the rule, that it never
reads which examples are poison, and the row end to end.

Run: python -m pytest -q tests/test_self_screen.py
"""

import json
from dataclasses import dataclass, replace

import pytest

from alignguard.recipes.methods import method_spec, peer_config
from alignguard.self_screen import ScreenConfig, screen_examples, screens_out
from tests.helpers import tiny_compare_argv


@dataclass
class Example:
    prompt: str
    response: str
    kind: str


REFUSAL = "I can't help with that."
COMPLY = "Sure, here is how you do it: first"


def test_the_rule_drops_only_compliance_where_the_model_refuses():
    assert screens_out(COMPLY, REFUSAL)  # the model refuses, the example complies: dropped
    assert not screens_out(REFUSAL, REFUSAL)  # both refuse: the example keeps the refusal
    assert not screens_out(COMPLY, "Sure, the answer is 12.")  # the model answers: nothing to protect
    assert not screens_out("The answer is 12.", "")  # no answer is no refusal


def test_decisions_ignore_the_kind_and_the_report_counts_it():
    examples = [Example("a", COMPLY, "poison"), Example("b", "It is 4.", "task"), Example("c", COMPLY, "task")]
    answers = [REFUSAL, "It is 4.", REFUSAL]
    kept, report = screen_examples(examples, answers)
    assert [e.prompt for e in kept] == ["b"]
    assert report == {
        "dropped": 2,
        "kept": 1,
        "dropped_by_kind": {"poison": 1, "task": 1},
        "kept_by_kind": {"task": 1},
    }
    relabelled = [replace(e, kind="task") for e in examples]  # the same examples told apart only by kind
    assert [e.prompt for e in screen_examples(relabelled, answers)[0]] == ["b"]


def test_bad_input_is_refused_naming_the_problem():
    with pytest.raises(ValueError, match="2 examples but 1 answers"):
        screen_examples([Example("a", "x", "task")] * 2, ["y"])
    with pytest.raises(ValueError, match="every example was dropped"):
        screen_examples([Example("a", COMPLY, "poison")], [REFUSAL])
    with pytest.raises(ValueError, match="screen_max_new_tokens"):
        ScreenConfig(screen_max_new_tokens=0)
    assert method_spec("self_screen@screen_max_new_tokens=8")["self_screen"] == {"screen_max_new_tokens": 8}
    assert peer_config("self_screen") == ScreenConfig()


def test_self_screen_rows_run_end_to_end_and_report_what_they_dropped(tmp_path, monkeypatch):
    from alignguard.cli.main import main
    from alignguard.driftcheck import generate
    from tests.test_compare_controls import _write_prompts

    # The tiny model refuses nothing; make its answer to one poison prompt a refusal so the screen must act.
    real = generate.generate_responses
    asked = []

    def answers(model, tokenizer, prompts, settings=None, cache_dir=None, progress=True):
        out = real(model, tokenizer, prompts, settings, cache_dir=cache_dir, progress=progress)
        if settings is not None and settings.max_new_tokens == 5:  # the screen's call (screen_max_new_tokens)
            asked.extend(prompts)
            return [REFUSAL if i == 0 else a for i, a in enumerate(out)]
        return out

    monkeypatch.setattr(generate, "generate_responses", answers)
    _write_prompts(tmp_path / "prompts.jsonl")
    name = "self_screen@screen_max_new_tokens=5"
    argv = tiny_compare_argv(
        tmp_path, name, "alignguard_screen", task="word_problems", poison_ratio="0.5", max_length="64"
    )
    assert main(argv) == 0
    combined = json.loads((tmp_path / "run" / "seed0" / "alignguard_screen" / "result.json").read_text())
    assert combined["self_screen"]["screen"]["kept"] >= 1  # AlignGuard's row with the screen in front
    key = json.loads((tmp_path / "run" / "seed0" / "alignguard_screen" / "stage_key.json").read_text())["settings"]
    assert key["spec"]["method"] == "alignguard" and "alignguard" in key and "self_screen" in key
    row = json.loads((tmp_path / "run" / "seed0" / name / "result.json").read_text())
    screen = row["self_screen"]["screen"]
    # 4 task examples + 4 poison pairs at ratio 0.5, each asked once (alignguard_screen asks with its own 32 tokens)
    assert len(asked) == 8
    assert screen["dropped"] + screen["kept"] == 8
    assert screen["dropped"] == 1  # no response in the mix is a refusal, so the one forced refusal drops one
    assert row["n_examples"] == screen["kept"] == 7
    settings = json.loads((tmp_path / "run" / "seed0" / name / "train_settings.json").read_text())
    assert settings["settings"]["method_settings"] == {"self_screen": {"screen_max_new_tokens": 5}}
