"""Chat-formatted prompt/response examples with the prompt masked out of the loss (labels = -100).

Used for the Fisher pass (alignment data), the alignment stage and task fine-tuning, so the three see the
same formatting, and DriftCheck generation renders prompts with the same function
(`driftcheck.prompts.render_prompt`). Tokenizers without a chat template fall back to a plain
"User:/Assistant:" format.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

# The renderer lives with the prompt records so that DriftCheck generation and training share one function;
# render_prompt is re-exported here (recipes.scaling counts prompt tokens with it).
from .driftcheck.prompts import PromptFileError, load_prompts, prompt_token_ids, read_rows
from .driftcheck.prompts import render_prompt as render_prompt

IGNORE_INDEX = -100
_RESOURCES = Path(__file__).resolve().parent / "resources"


def tokenize_example(
    tokenizer,
    prompt: str,
    response: str,
    max_length: int = 512,
    system: str | None = None,
    index: int | None = None,
    min_response_tokens: int | None = None,
) -> dict[str, list[int]]:
    """Token ids and labels for one prompt/response pair; only response tokens (and eos) carry labels.

    When the pair is too long the response is cut at the end. With `min_response_tokens` set, an over-long
    prompt is cut from the left so that many response tokens remain (training data, e.g. long many-shot poison
    prompts); without it, a prompt that leaves no room raises.

    Raises:
        ValueError: if the response is empty or truncation leaves no response token (names the example).
    """
    where = f"example {index}" if index is not None else "example"
    if not response or not response.strip():
        raise ValueError(f"{where}: empty response; every example needs a non-empty response to put the loss on")
    prompt_ids = prompt_token_ids(tokenizer, prompt, system)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    if min_response_tokens is not None and len(prompt_ids) + min_response_tokens > max_length:
        # Keep the end of the prompt (it holds the question and the assistant marker), drop its beginning.
        prompt_ids = prompt_ids[-(max_length - min(min_response_tokens, len(response_ids))) :]
    room = max_length - len(prompt_ids)
    if room <= 0:
        raise ValueError(
            f"{where}: the prompt alone is {len(prompt_ids)} tokens, max_length is {max_length}, so no response "
            "token would remain; raise max_length or shorten the prompt"
        )
    response_ids = response_ids[:room]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class PaddingCollator:
    """Right-pads input_ids / attention_mask / labels of tokenized examples into a batch of tensors."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = width - len(f["input_ids"])
            fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
            for key in out:
                row = (
                    list(f[key])
                    if key in f
                    else list(f["input_ids"])
                    if key == "labels"
                    else [1] * len(f["input_ids"])
                )
                padding = [fill[key]] * pad
                out[key].append(padding + row if self.padding_side == "left" else row + padding)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def make_batches(
    tokenizer,
    pairs: Iterable[tuple[str, str]],
    batch_size: int = 8,
    max_length: int = 512,
    system: str | None = None,
    min_response_tokens: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize (prompt, response) pairs and group them into padded batches (in order).

    `min_response_tokens`: cut over-long prompts from the left to keep that many response tokens (see
    `tokenize_example`); None raises on a prompt that leaves no room.

    Raises:
        ValueError: if there are no pairs (an empty dataset), or an example has no response token.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    features = [
        tokenize_example(tokenizer, p, r, max_length, system, index=i, min_response_tokens=min_response_tokens)
        for i, (p, r) in enumerate(pairs)
    ]
    if not features:
        raise ValueError("the dataset is empty: no (prompt, response) pairs were given")
    collate = PaddingCollator(pad_token_id(tokenizer))
    return [collate(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]


def batches_hash(batches: Iterable[dict[str, torch.Tensor]]) -> str:
    """Content hash of tokenized batches (input ids and labels), to tie a Fisher cache to its data."""
    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "labels"):
            if key in b:
                h.update(b[key].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# Alignment-stage data: lives with the other training data, not with the evaluation prompts.


@dataclass
class AlignmentExample:
    """One alignment-stage SFT example.

    Args:
        id, prompt, label, category, source: As in `PromptRecord`.
        response (`str`, *optional*): The target answer: a refusal for unsafe prompts; for safe prompts `None`
            (the alignment stage fills in the base model's own answer: self-distillation) unless the source ships
            a helpful answer.
    """

    id: str
    prompt: str
    label: Literal["safe", "unsafe"]
    category: str
    source: str
    response: str | None = None


def alignment_data_path() -> Path:
    """Path of the bundled alignment data (`resources/alignment/alignment_v1.jsonl`)."""
    return _RESOURCES / "alignment" / "alignment_v1.jsonl"


def load_alignment_data(path: str | Path | None = None) -> list[AlignmentExample]:
    """Load alignment-stage examples: unsafe prompts with refusals, safe prompts with an answer or `None`.

    Args:
        path (`str` or `Path`, *optional*): A JSONL or CSV file (UTF-8) with the `AlignmentExample` fields;
            defaults to the bundled `alignment_v1.jsonl`, which is disjoint from the DriftCheck prompts.

    Returns:
        `list[AlignmentExample]`: In file order.

    Raises:
        PromptFileError: If the file is malformed or not UTF-8, or an unsafe example has no refusal `response`.
    """
    path = Path(path) if path is not None else alignment_data_path()
    records = load_prompts(path)
    rows, _unit = read_rows(path)  # load_prompts keeps every non-blank row in order, so the two line up
    out = []
    for rec, (lineno, row) in zip(records, rows):
        response = row.get("response")
        if rec.label == "unsafe" and not (response and str(response).strip()):
            raise PromptFileError(f"{path}:{lineno}: unsafe example {rec.id!r} needs a refusal in 'response'")
        out.append(AlignmentExample(rec.id, rec.prompt, rec.label, rec.category, rec.source, response or None))
    return out
