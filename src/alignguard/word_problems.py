"""Generated arithmetic word problems (the `word_problems` task of `alignguard.tasks`).

Each problem is one or two steps of exact integer arithmetic (add, subtract, multiply, divide with no remainder)
written from one of `len(TEMPLATES)` templates, filled with a seeded choice of names, objects and numbers. The
training response is one natural sentence that ends on the answer's number ("Maya has 12 apples left."), so a
model fine-tuned on it keeps answering in sentences rather than collapsing into a one-word format.

Levels (`LEVELS`): `standard` draws from every template with its own number ranges (up to four-digit answers,
two-step problems); `easy` keeps the one-step add and subtract templates and draws every number from 2..20, so a
small model's answer is decided by reading the problem and keeping the sentence format, not by multi-digit
arithmetic it cannot learn in a short fine-tune (SmolLM2-135M scores a few percent on `standard`). For `easy` the
test split is decided by the arithmetic fact itself (operation and operands), not the problem text, so no fact
seen in training is asked again at test time with other names.

Scoring (`parse_last_number`): the *last* number in the response, exact match with the answer.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

INSTRUCTION = "{question} Answer in one short sentence."
# fmt: off
NAMES = (
    "Maya", "Liam", "Sofia", "Noah", "Aisha", "Omar", "Elena", "Kenji", "Priya", "Lucas",
    "Zara", "Mateo", "Hana", "Ethan", "Chloe", "Ravi", "Amara", "Leo", "Nora", "Samuel",
    "Mei", "Diego", "Fatima", "Jonas", "Ines", "Tomas", "Yara", "Kofi", "Ada", "Felix",
)
OBJECTS = (
    "apples", "pencils", "stickers", "marbles", "cookies", "shells", "cards", "balloons", "beads", "oranges",
    "crayons", "buttons", "toy cars", "candles", "plums", "lemons", "erasers", "postcards", "ribbons", "acorns",
)
# fmt: on


@dataclass(frozen=True)
class WordProblemTemplate:
    """One problem form.

    Args:
        question (`str`): the problem, with `{n}`/`{m}` (two different names), `{o}` (a plural object) and
            number slots (`{a}`, `{b}`, ...).
        response (`str`): the training answer, one sentence whose last number is `{ans}`.
        numbers (`Callable[[random.Random], dict]`): draws the number slots (exact division is drawn as
            divisor x quotient, so it always divides).
        answer (`Callable[[dict], int]`): the answer from the drawn numbers.
    """

    question: str = field(metadata={"help": "problem text with slots"})
    response: str = field(metadata={"help": "answer sentence ending on {ans}"})
    numbers: Callable[[random.Random], dict] = field(metadata={"help": "draws the number slots"})
    answer: Callable[[dict], int] = field(metadata={"help": "the answer from the numbers"})


def _r(**ranges):
    """Number slots drawn uniformly from inclusive ranges."""
    return lambda rng: {k: rng.randint(lo, hi) for k, (lo, hi) in ranges.items()}


def _div(dividend: str, divisor: tuple[int, int], quotient: tuple[int, int], **extra):
    """`dividend` = divisor `b` x quotient `q`, so the division is exact; `extra` slots drawn like `_r`."""

    def draw(rng):
        b, q = rng.randint(*divisor), rng.randint(*quotient)
        return {"b": b, "q": q, dividend: b * q, **_r(**extra)(rng)}

    return draw


def _keep_then_share(rng: random.Random) -> dict:
    """`a` objects of which `c` are kept and the rest, a multiple of `b`, shared: (a - c) / b is exact."""
    b, q, c = rng.randint(2, 6), rng.randint(2, 10), rng.randint(2, 9)
    return {"b": b, "c": c, "a": b * q + c}


def _even_total_pair(rng: random.Random) -> dict:
    """Two amounts `a`, `b` (each >= 2) with an even sum, so halving it is exact."""
    total = 2 * rng.randint(3, 40)
    a = rng.randint(2, total - 2)
    return {"a": a, "b": total - a}


T = WordProblemTemplate
# fmt: off
TEMPLATES: tuple[WordProblemTemplate, ...] = (
    # one step: add
    T("{n} has {a} {o}. {m} gives {n} {b} more. How many {o} does {n} have now?",
      "{n} has {ans} {o} now.", _r(a=(3, 60), b=(2, 40)), lambda v: v["a"] + v["b"]),
    T("{n} collected {a} {o} and {m} collected {b} {o}. How many {o} did they collect together?",
      "Together they collected {ans} {o}.", _r(a=(5, 90), b=(5, 90)), lambda v: v["a"] + v["b"]),
    T("{n} is {a} years old. {m} is {b} years older. How old is {m}?",
      "{m} is {ans} years old.", _r(a=(4, 40), b=(2, 30)), lambda v: v["a"] + v["b"]),
    T("{n} is {a} years old now. How old will {n} be in {b} years?",
      "{n} will be {ans} years old.", _r(a=(3, 50), b=(2, 25)), lambda v: v["a"] + v["b"]),
    T("A swimmer swims {a} laps on Monday and {b} laps on Tuesday. How many laps is that in total?",
      "That is {ans} laps in total.", _r(a=(10, 80), b=(10, 80)), lambda v: v["a"] + v["b"]),
    # one step: subtract
    T("{n} has {a} {o} and gives {b} of them to {m}. How many {o} does {n} have left?",
      "{n} has {ans} {o} left.", _r(a=(20, 90), b=(2, 18)), lambda v: v["a"] - v["b"]),
    T("{n} has {a} {o} and {m} has {b} {o}. How many more {o} does {n} have than {m}?",
      "{n} has {ans} more {o} than {m}.", _r(a=(40, 99), b=(5, 38)), lambda v: v["a"] - v["b"]),
    T("{n} has {a} dollars and buys a book for {b} dollars. How many dollars does {n} have left?",
      "{n} has {ans} dollars left.", _r(a=(30, 200), b=(5, 28)), lambda v: v["a"] - v["b"]),
    T("A class has {a} students. {b} of them are absent today. How many students are in class today?",
      "There are {ans} students in class today.", _r(a=(20, 40), b=(1, 9)), lambda v: v["a"] - v["b"]),
    T("A book has {a} pages. {n} has read {b} pages. How many pages are left to read?",
      "{n} has {ans} pages left to read.", _r(a=(120, 480), b=(20, 110)), lambda v: v["a"] - v["b"]),
    T("A jacket costs {a} dollars and a hat costs {b} dollars. How much more does the jacket cost, in dollars?",
      "The jacket costs {ans} dollars more.", _r(a=(40, 150), b=(8, 35)), lambda v: v["a"] - v["b"]),
    # one step: multiply
    T("{n} buys {a} bags of {o}. Each bag holds {b} {o}. How many {o} does {n} buy in total?",
      "{n} buys {ans} {o} in total.", _r(a=(2, 12), b=(3, 15)), lambda v: v["a"] * v["b"]),
    T("{n} buys {a} notebooks that cost {b} dollars each. How many dollars does {n} spend?",
      "{n} spends {ans} dollars.", _r(a=(2, 12), b=(2, 15)), lambda v: v["a"] * v["b"]),
    T("A cyclist rides {a} kilometres each day for {b} days. How many kilometres does the cyclist ride altogether?",
      "The cyclist rides {ans} kilometres altogether.", _r(a=(8, 60), b=(2, 9)), lambda v: v["a"] * v["b"]),
    T("{n} reads {a} pages a day. How many pages does {n} read in {b} days?",
      "{n} reads {ans} pages.", _r(a=(5, 40), b=(2, 14)), lambda v: v["a"] * v["b"]),
    T("{m} has {a} {o}. {n} has {b} times as many. How many {o} does {n} have?",
      "{n} has {ans} {o}.", _r(a=(3, 25), b=(2, 6)), lambda v: v["a"] * v["b"]),
    T("{n} saves {a} dollars every week. How many dollars does {n} save in {b} weeks?",
      "{n} saves {ans} dollars.", _r(a=(5, 60), b=(2, 20)), lambda v: v["a"] * v["b"]),
    T("A garden has {a} rows of tomato plants with {b} plants in each row. How many tomato plants are there?",
      "The garden has {ans} tomato plants.", _r(a=(3, 20), b=(4, 25)), lambda v: v["a"] * v["b"]),
    T("Tickets cost {a} dollars each. {n} buys tickets for {b} people. How many dollars does {n} pay?",
      "{n} pays {ans} dollars.", _r(a=(6, 45), b=(2, 9)), lambda v: v["a"] * v["b"]),
    T("A farmer collects {a} eggs a day. How many eggs does the farmer collect in {b} days?",
      "The farmer collects {ans} eggs.", _r(a=(12, 90), b=(2, 30)), lambda v: v["a"] * v["b"]),
    T("{n} practises piano for {a} minutes each day. How many minutes does {n} practise in {b} days?",
      "{n} practises for {ans} minutes.", _r(a=(15, 60), b=(2, 14)), lambda v: v["a"] * v["b"]),
    T("A bag of rice weighs {a} kilograms. How many kilograms do {b} bags weigh?",
      "Together the bags weigh {ans} kilograms.", _r(a=(2, 25), b=(2, 40)), lambda v: v["a"] * v["b"]),
    T("A car park has {a} levels with {b} spaces on each level. How many spaces does it have?",
      "The car park has {ans} spaces.", _r(a=(2, 9), b=(20, 250)), lambda v: v["a"] * v["b"]),
    # one step: divide (exactly)
    T("{n} shares {a} {o} equally among {b} friends. How many {o} does each friend get?",
      "Each friend gets {ans} {o}.", _div("a", (2, 9), (2, 12)), lambda v: v["a"] // v["b"]),
    T("{a} children are split into teams of {b}. How many teams are there?",
      "There are {ans} teams.", _div("a", (3, 8), (2, 10)), lambda v: v["a"] // v["b"]),
    T("A baker makes {a} cupcakes and packs them in boxes of {b}. How many boxes does the baker fill?",
      "The baker fills {ans} boxes.", _div("a", (4, 12), (2, 15)), lambda v: v["a"] // v["b"]),
    T("{b} friends share a bill of {a} dollars equally. How many dollars does each friend pay?",
      "Each friend pays {ans} dollars.", _div("a", (2, 8), (6, 40)), lambda v: v["a"] // v["b"]),
    T("{n} puts {a} {o} into jars, {b} in each jar. How many jars does {n} need?",
      "{n} needs {ans} jars.", _div("a", (3, 12), (2, 12)), lambda v: v["a"] // v["b"]),
    T("{n} has {a} stamps and puts {b} stamps on each page of an album. How many pages does {n} fill?",
      "{n} fills {ans} pages.", _div("a", (4, 10), (2, 20)), lambda v: v["a"] // v["b"]),
    T("A rope {a} metres long is cut into pieces of {b} metres. How many pieces are there?",
      "There are {ans} pieces.", _div("a", (2, 9), (2, 20)), lambda v: v["a"] // v["b"]),
    # two steps
    T("{n} had {a} {o}, found {b} more, then lost {c}. How many {o} does {n} have now?",
      "{n} now has {ans} {o}.", _r(a=(10, 60), b=(2, 30), c=(2, 9)), lambda v: v["a"] + v["b"] - v["c"]),
    T("A shelf has {a} rows with {b} books in each row, plus {c} books on top. How many books are on the shelf?",
      "There are {ans} books on the shelf.", _r(a=(2, 8), b=(5, 20), c=(2, 15)), lambda v: v["a"] * v["b"] + v["c"]),
    T("A bus has {a} passengers. At the next stop {b} get off and {c} get on. How many passengers are on the bus now?",
      "There are {ans} passengers on the bus now.", _r(a=(20, 50), b=(2, 15), c=(2, 20)),
      lambda v: v["a"] - v["b"] + v["c"]),
    T("{n} buys {a} packs of {o} with {b} in each pack and gives {c} away. How many {o} does {n} keep?",
      "{n} keeps {ans} {o}.", _r(a=(3, 9), b=(4, 12), c=(2, 10)), lambda v: v["a"] * v["b"] - v["c"]),
    T("A library had {a} books. It bought {b} new books and gave away {c} old ones. How many books does it have now?",
      "The library now has {ans} books.", _r(a=(800, 4000), b=(20, 300), c=(10, 200)),
      lambda v: v["a"] + v["b"] - v["c"]),
    T("A shop has {a} {o}. It sells {b} in the morning and {c} in the afternoon. How many {o} are left?",
      "The shop has {ans} {o} left.", _r(a=(40, 120), b=(5, 18), c=(5, 18)), lambda v: v["a"] - v["b"] - v["c"]),
    T("{n} has {a} {o} and keeps {c} of them. The rest are shared equally among {b} friends. How many {o} does each "
      "friend get?", "Each friend gets {ans} {o}.", _keep_then_share, lambda v: (v["a"] - v["c"]) // v["b"]),
    T("{n} had {a} {o}. After a birthday, {n} has twice as many plus {b} more. How many {o} does {n} have now?",
      "{n} now has {ans} {o}.", _r(a=(3, 30), b=(2, 15)), lambda v: 2 * v["a"] + v["b"]),
    T("{n} gathers {a} {o} and {m} gathers {b} {o}. They split them equally between the two of them. How many {o} "
      "does each get?", "Each of them gets {ans} {o}.",
      _even_total_pair, lambda v: (v["a"] + v["b"]) // 2),
    T("{n} has {c} dollars and buys {a} pens at {b} dollars each. How many dollars does {n} have left?",
      "{n} has {ans} dollars left.", _r(a=(2, 6), b=(2, 9), c=(60, 150)), lambda v: v["c"] - v["a"] * v["b"]),
    T("A hall has {a} tables with {b} chairs at each table. {c} chairs are empty. How many people are sitting?",
      "There are {ans} people sitting.", _r(a=(3, 12), b=(4, 8), c=(1, 10)), lambda v: v["a"] * v["b"] - v["c"]),
    T("{n} earns {a} dollars a day for {b} days and then spends {c} dollars. How many dollars does {n} have left?",
      "{n} has {ans} dollars left.", _r(a=(10, 50), b=(3, 10), c=(5, 29)), lambda v: v["a"] * v["b"] - v["c"]),
)
# fmt: on
del T

_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


@dataclass(frozen=True)
class WordProblem:
    """A filled-in template: the prompt, the integer answer and the answer sentence."""

    template: int = field(metadata={"help": "index into TEMPLATES"})
    prompt: str = field(metadata={"help": "the user message"})
    answer: int = field(metadata={"help": "the exact answer"})
    response: str = field(metadata={"help": "one sentence ending on the answer"})


_ONE_STEP_ADD_SUBTRACT = tuple(range(11))  # TEMPLATES[0:5] add, [5:11] subtract; slots a, b only


@dataclass(frozen=True)
class Level:
    """A difficulty level: which templates, and (optionally) one range for every number slot.

    Args:
        templates (`tuple[int, ...]`): indices into `TEMPLATES`.
        number_range (`tuple[int, int]` or `None`): when set, every number slot of the template is drawn uniformly
            from this inclusive range instead of the template's own ranges (only for templates whose slots are
            all plain `_r` draws); the test split is then decided by the arithmetic fact, not the text.
    """

    templates: tuple[int, ...] = field(metadata={"help": "indices into TEMPLATES"})
    number_range: tuple[int, int] | None = field(default=None, metadata={"help": "one range for every number"})
    show_working: bool = field(default=False, metadata={"help": "answer opens with the equation: '15 - 9 = 6.'"})

    def __post_init__(self):
        # One number range and the written equation assume two slots a, b and one operation per template (the
        # one-step add and subtract templates), which is what `_fact_key` and the equation read.
        if (self.number_range is not None or self.show_working) and not set(self.templates) <= set(
            _ONE_STEP_ADD_SUBTRACT
        ):
            raise ValueError("number_range / show_working: only for the one-step add and subtract templates (0-10)")


LEVELS: dict[str, Level] = {
    "standard": Level(tuple(range(len(TEMPLATES)))),
    "easy": Level(_ONE_STEP_ADD_SUBTRACT, number_range=(2, 20), show_working=True),
}


def _level(name: str) -> Level:
    if name not in LEVELS:
        raise ValueError(f"unknown word_problems level {name!r}; choose one of {sorted(LEVELS)}")
    return LEVELS[name]


def _is_add(index: int) -> bool:
    """Whether a one-step add/subtract template adds: TEMPLATES[0:5] add, [5:11] subtract."""
    return index < 5


def _fact_key(index: int, slots: dict) -> str:
    # The arithmetic behind a problem: the same for every template of one operation ("add 7 5" is one fact). The
    # split hashes this string: changing it moves problems between train and test.
    return f"{'add' if _is_add(index) else 'subtract'} {slots['a']} {slots['b']}"


def _number_slots(tpl: WordProblemTemplate) -> list[str]:
    """The number slots of a template's question, in order (every field but the names and the object)."""
    fields = [f for _, f, _, _ in string.Formatter().parse(tpl.question) if f]
    return sorted(set(fields) - {"n", "m", "o"}, key=fields.index)


def make_problem(rng: random.Random, level: str = "standard") -> tuple[WordProblem, str]:
    """One problem of `level` from a random template, and the key that decides its split.

    Draws again until the answer is at least 2 (a plural noun follows). The key is the problem text for levels
    with the templates' own ranges and the arithmetic fact for levels with one `number_range`.
    """
    spec = _level(level)
    index = rng.choice(spec.templates)
    tpl = TEMPLATES[index]
    while True:
        n, m = rng.sample(NAMES, 2)
        obj = rng.choice(OBJECTS)  # drawn before the numbers, as before levels existed: same standard problems
        if spec.number_range is None:
            numbers = tpl.numbers(rng)
        else:
            lo, hi = spec.number_range
            numbers = {k: rng.randint(lo, hi) for k in _number_slots(tpl)}
        slots = {"n": n, "m": m, "o": obj, **numbers}
        answer = tpl.answer(slots)
        if answer >= 2:
            break
    prompt = INSTRUCTION.format(question=tpl.question.format(**slots))
    response = tpl.response.format(**slots, ans=f"{answer:,}")
    if spec.show_working:
        # The untuned model already writes "17 + 3 = 20" on its own; training on the bare sentence taught it to
        # drop that working and guess (5% right); the equation keeps the computation in the answer.
        response = f"{slots['a']} {'+' if _is_add(index) else '-'} {slots['b']} = {answer}. {response}"
    key = prompt if spec.number_range is None else _fact_key(index, slots)
    return WordProblem(index, prompt, answer, response), key


def in_test_split(key: str) -> bool:
    """Whether a problem (its split key: text or fact) is in the test split: a hash, the same for every seed."""
    return hashlib.sha256(key.encode()).digest()[0] < 52  # ~20% of all problems


def problem_id(problem: WordProblem, prefix: str = "word_problems") -> str:
    return f"{prefix}/t{problem.template:02d}-{hashlib.sha256(problem.prompt.encode()).hexdigest()[:12]}"


def generate(split: str, n: int, seed: int, level: str = "standard") -> list[WordProblem]:
    """`n` distinct problems of `level` and `split` ("train" or "test"), drawn with `seed`."""
    _level(level)
    # The standard level keeps its seed string, so its problems are the ones earlier runs were measured on.
    name = "word_problems" if level == "standard" else f"word_problems-{level}"
    rng = random.Random(f"{name}-{split}-{seed}")
    seen: set[str] = set()
    out: list[WordProblem] = []
    while len(out) < n:
        problem, key = make_problem(rng, level)
        if problem.prompt in seen or in_test_split(key) != (split == "test"):
            continue
        seen.add(problem.prompt)
        out.append(problem)
    return out


def parse_last_number(response: str) -> int | float | None:
    """The last number in `response`, or `None` when it has none.

    Thousands separators are read ("1,200" -> 1200); a decimal part is kept ("12.0" -> 12.0, which equals 12;
    "12.5" does not); a full stop after a number is punctuation ("12." -> 12). Digits inside words ("mp3") and
    number words ("twelve") are not numbers.
    """
    matches = [m for m in _NUMBER_RE.finditer(response or "") if not _inside_word(response, m)]
    if not matches:
        return None
    text = matches[-1].group(0).replace(",", "")
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _inside_word(text: str, match: re.Match) -> bool:
    end = match.end()
    return end < len(text) and (text[end].isalpha() or text[end] == "_")
