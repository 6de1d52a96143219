"""Recipe of `alignguard fisher`: alignment data -> Fisher factors and subspaces in a run folder.

Components (fisher, subspace) stay free of I/O policy; this module decides where files go, which data is used
by default and how the stage resumes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import FisherConfig, SubspaceConfig
from ..config_values import require_at_least
from ..data import make_batches
from ..io import atomic_write_json


@dataclass
class FisherRunConfig:
    """Where the alignment data comes from and where the Fisher state goes (`alignguard fisher`).

    Args:
        model: model folder, .gguf file, registry name (see `alignguard models`) or tiny-llama.
        out: output folder (fisher.*, subspaces.*, config.yaml, fisher_data.json + fisher_batches.json: the pairs
            and how they were batched).
        alignment_data: JSONL of alignment examples (id, prompt, label, category, source, response); default: the
            bundled set.
        fisher_prompts: which examples feed the Fisher pass: `unsafe` (refusal behaviour) or `all`.
        responses: `model` = the model's own greedy responses (docs/design.md §3, cached), `dataset` = the file's responses.
        max_examples: use at most this many examples (seeded sample).
        batch_size: examples per Fisher batch.
        max_length: token limit of prompt + response.
        max_new_tokens: response length when `responses="model"`.
        cache_dir: generation cache folder (default: <out>/generation_cache).
        seed: seed for the example sample.
    """

    model: str = field(
        default="smollm2-135m-instruct", metadata={"help": "Model folder, .gguf, registry or tiny name."}
    )
    out: str = field(default="runs/fisher", metadata={"help": "Output folder."})
    alignment_data: str | None = field(default=None, metadata={"help": "Alignment JSONL (default: bundled set)."})
    fisher_prompts: Literal["unsafe", "all"] = field(default="unsafe", metadata={"help": "Examples for the pass."})
    responses: Literal["model", "dataset"] = field(
        default="model", metadata={"help": "'model' = its own greedy responses, 'dataset' = the file's."}
    )
    max_examples: int | None = field(default=128, metadata={"help": "Use at most this many examples."})
    batch_size: int = field(default=8, metadata={"help": "Examples per Fisher batch."})
    max_length: int = field(default=256, metadata={"help": "Token limit of prompt + response."})
    max_new_tokens: int = field(default=64, metadata={"help": "Response length for responses='model'."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Generation cache (default <out>/generation_cache)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the example sample and label sampling."})
    overwrite: bool = field(
        default=False, metadata={"help": "Delete what --out holds (another run or other settings) and start afresh."}
    )

    def __post_init__(self):
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples: must be >= 1 or None, got {self.max_examples}")
        require_at_least(self, ("batch_size", "max_length", "max_new_tokens"))
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")


FISHER_SETTINGS = "fisher_settings.json"


def alignment_pairs(model, tokenizer, cfg: FisherRunConfig, progress: bool = True) -> list[tuple[str, str]]:
    """(prompt, response) pairs for the Fisher pass, following `cfg` (model responses are generated once, cached)."""
    from ..data import load_alignment_data
    from ..driftcheck.generate import GenerationSettings, generate_responses

    examples = load_alignment_data(cfg.alignment_data)
    if cfg.fisher_prompts == "unsafe":
        examples = [e for e in examples if e.label == "unsafe"]
    if not examples:
        raise ValueError(f"alignment_data: no {cfg.fisher_prompts} examples in {cfg.alignment_data or 'bundled set'}")
    if cfg.max_examples is not None and len(examples) > cfg.max_examples:
        examples = random.Random(cfg.seed).sample(examples, cfg.max_examples)
    prompts = [e.prompt for e in examples]
    if cfg.responses == "dataset":
        missing = [e.id for e in examples if not e.response]
        if missing:
            raise ValueError(
                f"alignment_data: {len(missing)} examples have no response (e.g. {missing[:3]}); use "
                "--responses model to answer them with the model"
            )
        return [(e.prompt, e.response) for e in examples]
    cache = cfg.cache_dir or str(Path(cfg.out) / "generation_cache")
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens)
    responses = generate_responses(model, tokenizer, prompts, settings, cache_dir=cache, progress=progress)
    # An empty generation gives no response token; fall back to the dataset's response for that example.
    return [
        (p, r if r.strip() else (e.response or "I can't help with that."))
        for p, r, e in zip(prompts, responses, examples)
    ]


def run_fisher(
    cfg: FisherRunConfig,
    fisher_cfg: FisherConfig | None = None,
    subspace_cfg: SubspaceConfig | None = None,
    model=None,
    tokenizer=None,
):
    """Estimate the Fisher state and subspaces for `cfg.model` and write them to `cfg.out`.

    The settings are recorded last, in `<out>/fisher_settings.json`: a re-run with the same settings finds them and
    loads the finished state instead of estimating it again.

    Returns:
        (FisherState, AlignmentSubspaces).
    """
    from ..fisher import FisherState, estimate_fisher
    from ..subspace import AlignmentSubspaces, build_subspaces
    from .common import plain_settings

    fisher_cfg = fisher_cfg or FisherConfig()
    subspace_cfg = subspace_cfg or SubspaceConfig()
    out = Path(cfg.out)
    settings = plain_settings({"run": cfg, "fisher": fisher_cfg, "subspace": subspace_cfg})
    done = out / FISHER_SETTINGS
    if done.is_file() and json.loads(done.read_text()) == settings and (out / "subspaces.json").is_file():
        print(f"[fisher] {out}: estimated earlier with the same settings; skipped (loaded from {out})")
        return FisherState.load(out), AlignmentSubspaces.load(out)
    done.unlink(missing_ok=True)  # the outputs below are about to change
    if model is None:
        from ..models import load_model_and_tokenizer

        model, tokenizer, _ = load_model_and_tokenizer(cfg.model)
    pairs = alignment_pairs(model, tokenizer, cfg, progress=fisher_cfg.show_progress)
    atomic_write_json(out / "fisher_data.json", [{"prompt": p, "response": r} for p, r in pairs])
    # How those pairs were batched: `alignguard train --refresh_every` rebuilds the same batches from the two files.
    batching = {"batch_size": cfg.batch_size, "max_length": cfg.max_length, "min_response_tokens": cfg.max_length // 4}
    atomic_write_json(out / "fisher_batches.json", batching)
    # Over-long prompts lose their beginning rather than stopping the run, as in training (run_train).
    batches = make_batches(tokenizer, pairs, **batching)
    state = estimate_fisher(model, batches, fisher_cfg, model_id=cfg.model)
    state.save(out)
    subspaces = build_subspaces(state, subspace_cfg)
    subspaces.save(out)
    atomic_write_json(done, settings)
    return state, subspaces
