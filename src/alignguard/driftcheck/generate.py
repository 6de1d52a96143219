"""Batched greedy generation for DriftCheck, with an on-disk cache keyed by model, tokenizer and settings.

Prompts are rendered by `prompts.render_prompt`, the function training uses too (the tokenizer's chat
template with one user turn, an optional system turn and `add_generation_prompt=True`, else a plain
`User:/Assistant:` format), cut from the left to `max_prompt_tokens`, sorted by length, left-padded into
batches and decoded greedily; only the new tokens are decoded. Left padding plus the attention mask keeps every row's positions equal
to its unpadded run, so batched output matches per-prompt generation token for token (tested).

Generations are cached in `cache_dir/<key>.jsonl` where `key` hashes a fingerprint of the model's
weights (names, shapes, dtypes and per-tensor sums/norms, plus the PEFT adapter state), the
tokenizer (vocabulary size, special tokens, chat template) and the `GenerationSettings`. A fine-tuned
model or an enabled/disabled adapter therefore never reuses another model's generations. The cache
file is rewritten atomically after every batch, so a run killed mid-way keeps the batches it
finished and resumes from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignguard.driftcheck.prompts import FALLBACK_PROMPT_FORMAT, has_chat_template, prompt_token_ids, render_prompt
from alignguard.fingerprint import weights_fingerprint

CACHE_FORMAT_VERSION = 1
# Prompt-token limit when `max_prompt_tokens` is not set (and the model's context is larger): far above any
# DriftCheck prompt, far below what a pasted document would cost (a 5 MB prompt would need terabytes of attention).
DEFAULT_MAX_PROMPT_TOKENS = 1024


@dataclass
class GenerationSettings:
    """How DriftCheck generates responses.

    Args:
        max_new_tokens (`int`, defaults to `128`):
            Maximum number of new tokens per response.
        min_new_tokens (`int`, defaults to `0`):
            Minimum number of new tokens (eos is suppressed until then). Only benchmarks need it.
        batch_size (`int`, defaults to `16`):
            Number of prompts per left-padded batch.
        system_prompt (`str`, *optional*):
            System turn placed before every user turn.
        use_chat_template (`bool`, defaults to `True`):
            Render prompts with the tokenizer's chat template; with `False` (or a tokenizer without a
            template) the plain `User: ...\nAssistant: ` format training uses (`prompts.render_prompt`).
        max_prompt_tokens (`int`, *optional*):
            Longer rendered prompts keep only their last N tokens (cut from the left, as training does, so
            the question and the generation prompt stay), with a warning. Unset: the smaller of
            `DEFAULT_MAX_PROMPT_TOKENS` (1024) and the model's `max_position_embeddings - max_new_tokens`.
    """

    max_new_tokens: int = field(default=128, metadata={"help": "Maximum number of new tokens per response."})
    min_new_tokens: int = field(default=0, metadata={"help": "Minimum number of new tokens (benchmarks only)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per left-padded generation batch."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system turn before each prompt."})
    use_chat_template: bool = field(default=True, metadata={"help": "Render prompts with the chat template."})
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Longer prompts keep their last N tokens (cut from the left, with a warning). "
            "Default: min(1024, the model's max_position_embeddings - max_new_tokens)."
        },
    )

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"--min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"--max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_hash(prompt: str) -> str:
    """Hash of one raw prompt string (the cache's per-record key)."""
    return _sha256(prompt)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what in a tokenizer changes the generated text: vocabulary, special tokens, chat template."""
    parts = [
        type(tokenizer).__name__,
        str(len(tokenizer)),
        str(tokenizer.eos_token),
        str(tokenizer.pad_token),
        str(tokenizer.bos_token),
        str(getattr(tokenizer, "chat_template", None)),
    ]
    return _sha256("\n".join(parts))


def cache_key(model, tokenizer, settings: GenerationSettings) -> str:
    """The cache file stem for (model fingerprint, tokenizer fingerprint, settings)."""
    fields = {
        "format": CACHE_FORMAT_VERSION,
        "model": weights_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings.to_dict(),
    }
    if not (settings.use_chat_template and has_chat_template(tokenizer)):
        # Without a chat template prompts once went in raw; they now use the training format. Keying on it
        # keeps old raw-prompt generations from being reused, and leaves chat-template keys unchanged.
        fields["plain_format"] = FALLBACK_PROMPT_FORMAT
    return _sha256(json.dumps(fields, sort_keys=True))[:32]


def format_prompt(tokenizer, prompt: str, settings: GenerationSettings) -> str:
    """`prompts.render_prompt` with the settings' system prompt and chat-template switch (training renders
    with the same function, so a model is evaluated on the format it was trained on)."""
    return render_prompt(tokenizer, prompt, settings.system_prompt, settings.use_chat_template)


def _context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    value = getattr(cfg, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def prompt_token_limit(model, settings: GenerationSettings) -> int:
    """How many prompt tokens generation keeps: `settings.max_prompt_tokens`, else the smaller of
    `DEFAULT_MAX_PROMPT_TOKENS` and the model's `max_position_embeddings - max_new_tokens`.

    Raises:
        ValueError: the prompt limit plus `max_new_tokens` does not fit the model's context (names both fields).
    """
    context = _context_length(model)
    if settings.max_prompt_tokens is not None:
        if context is not None and settings.max_prompt_tokens + settings.max_new_tokens > context:
            raise ValueError(
                f"--max_prompt_tokens {settings.max_prompt_tokens} + --max_new_tokens {settings.max_new_tokens} "
                f"exceeds the model's context of {context} tokens (config max_position_embeddings); lower one of them"
            )
        return settings.max_prompt_tokens
    if context is None:
        return DEFAULT_MAX_PROMPT_TOKENS
    if context - settings.max_new_tokens < 1:
        raise ValueError(
            f"--max_new_tokens {settings.max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{context} tokens (config max_position_embeddings); lower --max_new_tokens"
        )
    return min(DEFAULT_MAX_PROMPT_TOKENS, context - settings.max_new_tokens)


def _longest_token_chars(tokenizer) -> int:
    return max((len(t) for t in tokenizer.get_vocab()), default=1)


def _encode_all(
    tokenizer, prompts: list[str], settings: GenerationSettings, limit: int
) -> tuple[dict[str, list[int]], int]:
    """Each prompt's token ids, cut from the left to their last `limit` tokens, and how many prompts were cut."""
    encoded, n_cut, span = {}, 0, None
    for prompt in prompts:
        text = prompt
        # Tokenizing a multi-megabyte prompt takes tens of seconds, for tokens that are dropped anyway: first drop
        # text that no kept token can come from (each token spans at most `longest` characters; 2x for slack).
        if len(prompt) > 2 * limit:
            span = span or 2 * limit * _longest_token_chars(tokenizer)
            text = prompt[-span:]
        ids = prompt_token_ids(tokenizer, text, settings.system_prompt, settings.use_chat_template)
        n_cut += len(ids) > limit or len(text) < len(prompt)
        encoded[prompt] = ids[-limit:]
    return encoded, n_cut


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _generation_config(model, tokenizer, settings: GenerationSettings, pad_id: int):
    from transformers import GenerationConfig

    # A fresh config: a model's shipped generation_config may turn on sampling (temperature, top_p).
    base = getattr(model, "generation_config", None)
    eos = getattr(base, "eos_token_id", None) if base is not None else None
    eos_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens or None,
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=pad_id,
        use_cache=True,
    )


def generate_token_ids(model, tokenizer, prompts: list[str], settings: GenerationSettings) -> list[list[int]]:
    """Generate greedily for `prompts` in ONE left-padded batch; return the new token ids of each row.

    Trailing padding after eos is dropped; eos itself is kept so callers can see where a row stopped.
    The caller is responsible for `model.eval()`/`torch.no_grad()` (see `generate_responses`).
    """
    encoded, _ = _encode_all(tokenizer, prompts, settings, prompt_token_limit(model, settings))
    return _generate_batch(model, tokenizer, [encoded[p] for p in prompts], settings)


def _generate_batch(model, tokenizer, encoded: list[list[int]], settings: GenerationSettings) -> list[list[int]]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token; cannot pad a batch")
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        # Left padding: every row's last prompt token sits at the same column, where generation starts.
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    device = _model_device(model)
    gen_config = _generation_config(model, tokenizer, settings, pad_id)
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=gen_config
    )
    new = out[:, width:].tolist()
    stop_ids = set(gen_config.eos_token_id or [])
    results = []
    for row in new:
        cut = len(row)
        for i, tok in enumerate(row):
            if tok in stop_ids:
                cut = i + 1
                break
        results.append(row[:cut])
    return results


class GenerationCache:
    """One JSONL file of `{"prompt_sha256", "prompt", "response"}` records for one cache key.

    Args:
        path (`str` or `os.PathLike`):
            The JSONL file; created on the first `add`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[str, str] = {}
        self._lines: list[str] = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.records[rec["prompt_sha256"]] = rec["response"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    # A damaged line (e.g. from an older non-atomic writer) is dropped, not fatal.
                    continue
                self._lines.append(line)

    def get(self, prompt: str) -> str | None:
        return self.records.get(prompt_hash(prompt))

    def add(self, prompts: list[str], responses: list[str]) -> None:
        from alignguard.io import atomic_write_text

        for p, r in zip(prompts, responses):
            key = prompt_hash(p)
            if key in self.records:
                continue
            self.records[key] = r
            self._lines.append(json.dumps({"prompt_sha256": key, "prompt": p, "response": r}, ensure_ascii=False))
        # Rewrite the whole file atomically: a kill mid-write leaves the previous complete version.
        atomic_write_text(self.path, "\n".join(self._lines) + "\n")


def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    settings: GenerationSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[str]:
    """Generate one greedy response per prompt, batched and cached.

    Args:
        model (`transformers.PreTrainedModel` or `peft.PeftModel`):
            The causal LM. Its training mode is restored on return.
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            Tokenizer with (preferably) a chat template. Its `padding_side` is restored on return; a
            tokenizer without a pad token pads with eos.
        prompts (`list[str]`):
            Raw user prompts. Duplicates are generated once.
        settings (`GenerationSettings`, *optional*):
            Generation settings; the defaults when omitted.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Folder for the generation cache; no caching when `None`.
        progress (`bool`, defaults to `True`):
            Show a tqdm progress bar.

    Returns:
        `list[str]`: the decoded new tokens (special tokens skipped), in the order of `prompts`.
    """
    settings = settings or GenerationSettings()
    cache = None
    if cache_dir is not None:
        cache = GenerationCache(Path(cache_dir) / f"{cache_key(model, tokenizer, settings)}.jsonl")

    unique = list(dict.fromkeys(prompts))
    done: dict[str, str] = {}
    todo = []
    for p in unique:
        hit = cache.get(p) if cache is not None else None
        if hit is not None:
            done[p] = hit
        else:
            todo.append(p)

    if todo:
        limit = prompt_token_limit(model, settings)
        encoded, n_cut = _encode_all(tokenizer, todo, settings, limit)
        if n_cut:
            warnings.warn(
                f"{n_cut} of {len(todo)} prompts are longer than {limit} tokens and were cut from the left "
                f"to their last {limit} tokens (max_prompt_tokens); shorten them or raise --max_prompt_tokens",
                stacklevel=2,
            )
        # Longest first: similar lengths share a batch (little padding) and an OOM shows up at once.
        todo.sort(key=lambda p: -len(encoded[p]))
        was_training = model.training
        old_side = getattr(tokenizer, "padding_side", None)
        tokenizer.padding_side = "left"
        model.eval()
        try:
            with torch.no_grad(), tqdm(total=len(todo), desc="generate", disable=not progress, unit="prompt") as bar:
                for start in range(0, len(todo), settings.batch_size):
                    batch = todo[start : start + settings.batch_size]
                    ids = _generate_batch(model, tokenizer, [encoded[p] for p in batch], settings)
                    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
                    done.update(zip(batch, texts))
                    if cache is not None:
                        cache.add(batch, texts)
                    bar.update(len(batch))
        finally:
            model.train(was_training)
            if old_side is not None:
                tokenizer.padding_side = old_side
    return [done[p] for p in prompts]
