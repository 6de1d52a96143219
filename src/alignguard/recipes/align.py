"""The alignment stage (docs/design.md §7): LoRA SFT on refusals + helpful answers, merged into a normal HF model.

Unsafe prompts are trained towards the dataset's refusals; safe prompts (benign look-alikes included, so the
model does not learn "refuse anything that sounds edgy") towards the base model's *own* answers
(self-distillation, generated once and cached), so helpfulness is kept rather than replaced by our text.
The output folder is a plain `save_pretrained` model plus `align_info.json` recording the base model, which is
what Safe LoRA needs as its (base, aligned) pair.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..config_values import require_at_least, require_positive
from ..io import atomic_write_json
from .common import add_lora, checkpointed_training_args, latest_checkpoint, restore_final_checkpoint

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AlignRunConfig:
    """Options of `alignguard align`.

    Args:
        model: base model (folder, .gguf, registry or tiny name).
        out: folder for the merged aligned model.
        alignment_data: alignment JSONL (default: the bundled set, disjoint from DriftCheck).
        max_examples: examples used (a seeded sample with `safe_fraction` safe ones); None = all.
        safe_fraction: share of safe prompts in the `max_examples` sample. More benign than unsafe data limits
            over-refusal (Bianchi et al., ICLR 2024, "Safety-Tuned LLaMAs"); 0.5 is a balanced mix.
        max_steps / batch_size / learning_rate / lora_r / lora_alpha / target_modules / max_length: the SFT.
        max_new_tokens: length of the self-distilled answers to safe prompts.
        seed: seed of sampling and training.
    """

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Base model to align."})
    out: str = field(default="runs/aligned", metadata={"help": "Output folder of the merged aligned model."})
    alignment_data: str | None = field(default=None, metadata={"help": "Alignment JSONL (default: bundled)."})
    max_examples: int | None = field(default=None, metadata={"help": "Use at most this many examples."})
    safe_fraction: float = field(default=0.5, metadata={"help": "Share of safe prompts in the sample (0..1)."})
    max_steps: int = field(default=40, metadata={"help": "SFT optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "SFT batch size."})
    learning_rate: float = field(default=4e-4, metadata={"help": "SFT learning rate."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the alignment adapter."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha of the alignment adapter."})
    target_modules: list[str] = field(
        default_factory=lambda: list(ALL_PROJECTIONS), metadata={"help": "LoRA targets of the alignment adapter."}
    )
    max_length: int = field(default=256, metadata={"help": "Token limit of prompt + response."})
    max_new_tokens: int = field(default=96, metadata={"help": "Length of self-distilled answers to safe prompts."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    overwrite: bool = field(
        default=False, metadata={"help": "Delete what --out holds (another run or other settings) and start afresh."}
    )

    def __post_init__(self):
        require_at_least(self, ("max_steps", "batch_size", "lora_r", "max_length", "max_new_tokens"))
        if not 0.0 <= self.safe_fraction <= 1.0:
            raise ValueError(f"safe_fraction: must be in [0, 1], got {self.safe_fraction}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples: must be >= 1 or None, got {self.max_examples}")
        require_positive(self, ("learning_rate", "lora_alpha"))
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if not self.target_modules:
            raise ValueError("target_modules: give at least one module name (e.g. q_proj v_proj)")


def sample_alignment_examples(examples: list, cfg: AlignRunConfig, rng: random.Random) -> list:
    """`cfg.max_examples` of `examples` (all when None), `cfg.safe_fraction` of them safe where there are enough."""
    if cfg.max_examples is None or len(examples) <= cfg.max_examples:
        return list(examples)
    unsafe = [e for e in examples if e.label == "unsafe"]
    safe = [e for e in examples if e.label == "safe"]
    n_safe = min(round(cfg.max_examples * cfg.safe_fraction), len(safe))
    n_unsafe = min(cfg.max_examples - n_safe, len(unsafe))
    return rng.sample(unsafe, n_unsafe) + rng.sample(safe, n_safe)


def alignment_sft_pairs(model, tokenizer, cfg: AlignRunConfig, progress: bool = True) -> list[tuple[str, str]]:
    """(prompt, response) pairs: refusals for unsafe prompts, the model's own answers for safe ones."""
    from ..data import load_alignment_data
    from ..driftcheck.generate import GenerationSettings, generate_responses

    rng = random.Random(cfg.seed)
    examples = sample_alignment_examples(load_alignment_data(cfg.alignment_data), cfg, rng)
    need = [e.prompt for e in examples if e.response is None]
    answers = {}
    if need:
        settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens)
        outs = generate_responses(
            model, tokenizer, need, settings, cache_dir=str(Path(cfg.out) / "generation_cache"), progress=progress
        )
        answers = dict(zip(need, outs))
    pairs = []
    for e in examples:
        response = e.response if e.response is not None else answers.get(e.prompt, "")
        if response.strip():  # an empty self-distilled answer teaches nothing
            pairs.append((e.prompt, response))
    rng.shuffle(pairs)
    return pairs


def _finished(out: Path, cfg: AlignRunConfig) -> bool:
    """Whether `out` holds a merged model aligned with these settings (align_info.json records them)."""
    from .common import plain_settings

    info = out / "align_info.json"
    if not (info.is_file() and (out / "config.json").is_file()):
        return False
    recorded = json.loads(info.read_text()).get("config", {})
    return plain_settings({"c": recorded}) == plain_settings({"c": cfg})


def run_align(cfg: AlignRunConfig, model=None, tokenizer=None, progress: bool = True) -> Path:
    """Align `cfg.model` with LoRA SFT, merge, and save to `cfg.out`; returns the folder.

    Upon completion `cfg.out` holds config.json, model.safetensors, the tokenizer and align_info.json.
    """
    from transformers import Trainer

    from ..data import PaddingCollator, pad_token_id, tokenize_example

    out = Path(cfg.out)
    if _finished(out, cfg):
        print(f"[align] {out}: aligned earlier with the same settings; skipped (align_info.json kept)")
        return out
    if model is None:
        from ..models import load_model_and_tokenizer

        model, tokenizer, _ = load_model_and_tokenizer(cfg.model)
    pairs = alignment_sft_pairs(model, tokenizer, cfg, progress=progress)
    features = [tokenize_example(tokenizer, p, r, cfg.max_length, index=i) for i, (p, r) in enumerate(pairs)]
    peft_model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.target_modules)
    args = checkpointed_training_args(
        out / "checkpoints",
        cfg.max_steps,
        cfg.batch_size,
        cfg.learning_rate,
        cfg.seed,
        max(1, cfg.max_steps // 2),
        progress,
        lr_scheduler_type="cosine",
        warmup_steps=min(5, cfg.max_steps // 10),
    )
    trainer = Trainer(
        model=peft_model, args=args, train_dataset=features, data_collator=PaddingCollator(pad_token_id(tokenizer))
    )
    last = latest_checkpoint(out / "checkpoints")
    if last is not None and json.loads((last / "trainer_state.json").read_text())["global_step"] >= cfg.max_steps:
        restore_final_checkpoint(trainer, peft_model, last)  # killed after the last checkpoint, before the merge
    else:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    merged = peft_model.merge_and_unload()
    tmp = out.with_name(out.name + ".tmp-merge")
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    atomic_write_json(
        tmp / "align_info.json",
        {
            "base_model": cfg.model,
            "n_examples": len(pairs),
            "config": vars(cfg),
            "log_history": trainer.state.log_history,
        },
    )
    # Move the finished model files into place; checkpoints and the generation cache stay where they are.
    out.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        item.replace(out / item.name)
    tmp.rmdir()
    return out
