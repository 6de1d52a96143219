"""Self-screened fine-tuning data: drop the training examples that would teach the aligned model to stop refusing.

The screen asks the aligned model about itself (the STAR-DSS, SEAL and Lisa line of data screening, in its
simplest form): for every training example, does the aligned model refuse the prompt (its own greedy answer,
judged by the pattern judge) while the example's response does not? Such an example asks the fine-tune for
exactly the behaviour the alignment should keep (unsafe prompt -> compliant answer), so it is dropped. Everything
else is kept, including examples the model refuses whose response is itself a refusal.

The screen never sees which examples are poison: the decision uses only the prompt, the response and the
model's own answer. The example's `kind` ("task" / "poison") is read afterwards, for the report of what the
screen dropped (how many poison pairs it caught and how many task examples it cost). What it cannot catch:
poison whose prompts the aligned model does not refuse (benign-looking prompts, identity or role-play attacks),
and an over-refusing model costs task examples, which the report shows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from .config_values import require_whole_number


@dataclass
class ScreenConfig:
    """Options of the self-screen rows (`self_screen`; per row: `self_screen@screen_max_new_tokens=48`).

    Args:
        screen_max_new_tokens: tokens of the aligned model's own answer to each training prompt (32 decide a
            refusal for DriftCheck too).
    """

    screen_max_new_tokens: int = field(
        default=32, metadata={"help": "Tokens of the aligned model's own answer to each training prompt."}
    )

    def __post_init__(self):
        require_whole_number(self, ("screen_max_new_tokens",))

    def to_dict(self) -> dict:
        return asdict(self)


def screens_out(response: str, own_answer: str) -> bool:
    """Whether an example is dropped: the model refuses its prompt and its response is not a refusal. An empty
    answer is not a refusal here (the pattern judge counts it as one for DriftCheck, where saying nothing to an
    unsafe prompt is safe; here it says nothing about the prompt)."""
    from .driftcheck.judge import is_refusal

    return bool(own_answer.strip()) and is_refusal(own_answer) and not is_refusal(response)


def screen_examples(examples: list, own_answers: list[str]) -> tuple[list, dict]:
    """Drop the `examples` (objects with `.response` and `.kind`) that `screens_out` given the model's own answer
    to each prompt (`own_answers`, in the same order).

    Returns:
        (the kept examples in their order, a report: how many were dropped and kept, by kind).

    Raises:
        ValueError: the lengths differ, or every example is dropped (nothing left to train on).
    """
    if len(examples) != len(own_answers):
        raise ValueError(f"screen_examples: {len(examples)} examples but {len(own_answers)} answers")
    drop = [screens_out(e.response, a) for e, a in zip(examples, own_answers)]
    kept = [e for e, d in zip(examples, drop) if not d]
    if not kept:
        raise ValueError(
            "self-screen: the aligned model refuses every training prompt, so every example was dropped; check "
            "the task data, or use another method"
        )
    report = {
        "dropped": sum(drop),
        "kept": len(kept),
        "dropped_by_kind": dict(sorted(Counter(e.kind for e, d in zip(examples, drop) if d).items())),
        "kept_by_kind": dict(sorted(Counter(e.kind for e in kept).items())),
    }
    return kept, report
