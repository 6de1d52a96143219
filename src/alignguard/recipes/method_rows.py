"""What a compare row adds to plain LoRA training, by method: replayed refusals, untruncated or random subspaces,
the peers' preparation (AsFT's penalty, LoX's extrapolation, gradient surgery's alignment batches, the
self-screen's data filter, Lisa's alignment batches) and Safe LoRA's projection after training.

`compare.run_method` trains and evaluates every row the same way; this module holds the per-method pieces so
that the harness stays one loop (docs/design.md §5).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..config import SubspaceConfig
from ..io import atomic_write_json
from ..lox import apply_lox_
from .methods import peer_config
from .safe_lora import apply_safe_lora_


def replay_pairs(n_task: int, ratio: float, seed: int) -> list[tuple[str, str]]:
    """Refusal examples from the alignment data (disjoint from DriftCheck) so they make `ratio` of the mix."""
    from ..data import load_alignment_data

    pool = [(e.prompt, e.response) for e in load_alignment_data() if e.label == "unsafe" and e.response]
    n = min(len(pool), round(ratio * n_task / (1 - ratio))) if ratio > 0 else 0
    return random.Random(seed).sample(pool, n)


def full_spectrum_subspaces(fisher_dir: Path):
    """Every eigenvector of every factor: R_A becomes the EWC quadratic with the untruncated output factor (and,
    when the Fisher state has them, the untruncated input factors)."""
    from ..fisher import FisherState
    from ..subspace import build_subspaces

    state = FisherState.load(fisher_dir)
    d_max = max(d for d, _ in state.dims.values())
    d_in_max = max(d for _, d in state.dims.values())
    config = SubspaceConfig(fixed_m=d_max, m_min=1, m_max=d_max, eigen_solver="exact", input_rank=d_in_max)
    return build_subspaces(state, config)


def row_subspaces(spec: dict, fisher_dir: Path, seed: int):
    """The subspaces a row regularises with, when they are not the Fisher folder's own (None: its own)."""
    from ..subspace import AlignmentSubspaces, random_subspaces

    if spec.get("subspaces") == "random":
        return random_subspaces(AlignmentSubspaces.load(fisher_dir), seed=seed)
    if spec.get("subspaces") == "full":
        return full_spectrum_subspaces(fisher_dir)
    return None


def _prepare_surgery(cfg, options, model, tokenizer, target_modules, fisher_dir: Path, extra: dict):
    from .surgery import prepare_surgery  # imports transformers.Trainer: only when used

    info, extra["trainer_factory"] = prepare_surgery(fisher_dir, tokenizer, options)
    return info


def _prepare_lisa(cfg, options, model, tokenizer, target_modules, fisher_dir: Path, extra: dict):
    from .lisa import prepare_lisa  # imports transformers.Trainer: only when used

    info, extra["trainer_factory"] = prepare_lisa(fisher_dir, tokenizer, options)
    return info


def _prepare_self_screen(cfg, options, model, tokenizer, target_modules, fisher_dir: Path, extra: dict):
    extra["example_filter"] = screen_filter(options, cfg.eval_batch_size, str(Path(cfg.out) / "generation_cache"))
    return options.to_dict()


def _prepare_lox(cfg, options, model, tokenizer, target_modules, fisher_dir: Path, extra: dict):
    base = load_base(cfg.model, cfg.base_model, "lox")
    return apply_lox_(model, base, options, target_modules)


def _prepare_asft(cfg, options, model, tokenizer, target_modules, fisher_dir: Path, extra: dict):
    from .asft import prepare_asft  # imports transformers.Trainer: only when used

    base = load_base(cfg.model, cfg.base_model, "asft")
    info, extra["trainer_factory"] = prepare_asft(model, base, options, target_modules)
    return info


# One set-up function per peer of `methods.PEER_CONFIGS`: each returns what it applied and fills `extra` with the
# `run_train` keyword arguments it needs (a trainer factory, an example filter).
PEER_SETUPS = {
    "surgery": _prepare_surgery,
    "lisa": _prepare_lisa,
    "self_screen": _prepare_self_screen,
    "lox": _prepare_lox,
    "asft": _prepare_asft,
}


# The value a peer's trainer logs beside `loss` (key in the log history) and the result.json field that lists it.
PEER_LOGS = {
    "asft": ("logged_penalty", "asft_penalty"),
    "surgery": ("logged_conflict", "surgery_conflict"),
    "lisa": ("logged_proximal", "lisa_proximal"),
}


def prepare_peer(cfg, name: str, peer: str, model, tokenizer, target_modules, fisher_dir: Path) -> tuple:
    """Prepare a peer's row (`cfg`: the CompareConfig) before LoRA is added (and before any training).

    Returns (what the peer applied, extra `run_train` keyword arguments). LoX and AsFT read the unaligned base:
    LoX changes `model` in place (the row trains, and is evaluated, on the extrapolated model; re-done on every
    load), AsFT returns its trainer factory. Gradient surgery reads the Fisher folder's alignment data; the
    self-screen asks the model for its own answers to the training prompts (cached with the run's generations).
    """
    options = peer_config(name)
    extra = {"method_settings": {peer: options.to_dict()}}
    info = PEER_SETUPS[peer](cfg, options, model, tokenizer, target_modules, fisher_dir, extra)
    return info, extra


def screen_filter(options, batch_size: int, cache_dir: str):
    """`run_train`'s `example_filter` for a self-screen row: the model's own greedy answers to the mix's prompts,
    then `self_screen.screen_examples`."""

    def example_filter(mix, model, tokenizer):
        from ..driftcheck.generate import GenerationSettings, generate_responses
        from ..self_screen import screen_examples

        settings = GenerationSettings(max_new_tokens=options.screen_max_new_tokens, batch_size=batch_size)
        answers = generate_responses(model, tokenizer, [e.prompt for e in mix], settings, cache_dir=cache_dir)
        return screen_examples(mix, answers)

    return example_filter


def safe_lora_once(model_spec: str, base_model: str | None, threshold: float, peft_model, mdir: Path) -> dict:
    """Apply Safe LoRA's projection to the trained adapter unless <row>/safe_lora.json says it was applied
    (projecting twice is not the same as once: C is not idempotent)."""
    done = mdir / "safe_lora.json"
    if done.is_file():
        return json.loads(done.read_text())
    base = load_base(model_spec, base_model, "Safe LoRA")
    info = apply_safe_lora_(peft_model, base, threshold)
    peft_model.save_pretrained(str(mdir / "adapter"))
    atomic_write_json(done, info)
    return info


def base_of(model_spec: str, method: str = "Safe LoRA") -> str:
    """The base model recorded in an aligned folder's align_info.json."""
    info = Path(model_spec) / "align_info.json"
    if not info.is_file():
        raise ValueError(f"base_model: {model_spec} has no align_info.json; pass --base_model for {method}")
    return json.loads(info.read_text())["base_model"]


def load_base(model_spec: str, base_model: str | None, method: str):
    """The unaligned base model (`--base_model`, else the aligned folder's align_info.json) for `method`."""
    from ..models import load_model_and_tokenizer

    return load_model_and_tokenizer(base_model or base_of(model_spec, method))[0]
