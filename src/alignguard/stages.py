"""Recipes: the `fisher` and `train` stages as functions over run configs (the CLI and the demo call these).

Components (fisher, subspace, regularizers, trainer) stay free of I/O policy; this module decides where
files go, which data is used by default, and how a run resumes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config import AlignGuardConfig, FisherConfig, SubspaceConfig
from .data import make_batches
from .io import atomic_write_json

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class FisherRunConfig:
    """Where the alignment data comes from and where the Fisher state goes (`alignguard fisher`).

    Args:
        model: model folder, .gguf file, registry name (see `alignguard models`) or tiny-llama.
        out: output folder (fisher.*, subspaces.*, config.yaml, fisher_data.jsonl).
        alignment_data: JSONL of alignment examples (id, prompt, label, category, source, response); default: the
            bundled set.
        fisher_prompts: which examples feed the Fisher pass: `unsafe` (refusal behaviour) or `all`.
        responses: `model` = the model's own greedy responses (DESIGN §3, cached), `dataset` = the file's responses.
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

    def __post_init__(self):
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples: must be >= 1 or None, got {self.max_examples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")


def alignment_pairs(model, tokenizer, cfg: FisherRunConfig, progress: bool = True) -> list[tuple[str, str]]:
    """(prompt, response) pairs for the Fisher pass, following `cfg` (model responses are generated once, cached)."""
    from .driftcheck.generate import GenerationSettings, generate_responses
    from .driftcheck.prompts import load_alignment_data

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


def add_lora(model, r: int, alpha: float, targets: list[str], dropout: float = 0.0, use_rslora: bool = False):
    """`get_peft_model` with a causal-LM `LoraConfig` (the training and alignment stages share it)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def run_fisher(
    cfg: FisherRunConfig,
    fisher_cfg: FisherConfig | None = None,
    subspace_cfg: SubspaceConfig | None = None,
    model=None,
    tokenizer=None,
):
    """Estimate the Fisher state and subspaces for `cfg.model` and write them to `cfg.out`.

    Returns:
        (FisherState, AlignmentSubspaces).
    """
    from .fisher import estimate_fisher
    from .subspace import build_subspaces

    fisher_cfg = fisher_cfg or FisherConfig()
    subspace_cfg = subspace_cfg or SubspaceConfig()
    if model is None:
        from .models import load_model_and_tokenizer

        model, tokenizer, _ = load_model_and_tokenizer(cfg.model)
    out = Path(cfg.out)
    pairs = alignment_pairs(model, tokenizer, cfg, progress=fisher_cfg.show_progress)
    atomic_write_json(out / "fisher_data.json", [{"prompt": p, "response": r} for p, r in pairs])
    # Over-long prompts lose their beginning rather than stopping the run, as in training (run_train).
    batches = make_batches(
        tokenizer, pairs, batch_size=cfg.batch_size, max_length=cfg.max_length, min_response_tokens=cfg.max_length // 4
    )
    state = estimate_fisher(model, batches, fisher_cfg, model_id=cfg.model)
    state.save(out)
    subspaces = build_subspaces(state, subspace_cfg)
    subspaces.save(out)
    return state, subspaces


@dataclass
class TrainRunConfig:
    """Task fine-tuning with LoRA, plain or with the AlignGuard loss (`alignguard train`).

    Args:
        model: model folder, .gguf, registry name or tiny name.
        out: output folder (adapter, AlignGuard state, config.yaml, checkpoints/).
        method: `lora` (plain PEFT LoRA) or `alignguard`.
        fisher: folder written by `alignguard fisher` (needed by `alignguard`).
        task: downstream task (`bbc_topic` or `arithmetic`).
        n_train: task examples.
        poison_ratio: fraction of harmful pairs in the final mix (the harmful fine-tuning setting).
        lora_r / lora_alpha / lora_dropout / target_modules / use_rslora: the PEFT LoraConfig.
        max_steps / batch_size / grad_accum / learning_rate / max_length / seed: training.
        save_steps: checkpoint every this many steps; a re-run of the same command resumes from the last one.
    """

    model: str = field(
        default="smollm2-135m-instruct", metadata={"help": "Model folder, .gguf, registry or tiny name."}
    )
    out: str = field(default="runs/train", metadata={"help": "Output folder."})
    method: Literal["lora", "alignguard"] = field(default="alignguard", metadata={"help": "lora or alignguard."})
    fisher: str | None = field(default=None, metadata={"help": "Folder from `alignguard fisher` (for alignguard)."})
    task: Literal["bbc_topic", "arithmetic"] = field(default="bbc_topic", metadata={"help": "Downstream task."})
    n_train: int = field(default=200, metadata={"help": "Task training examples."})
    poison_ratio: float = field(default=0.0, metadata={"help": "Fraction of harmful pairs in the training mix."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS), metadata={"help": "LoRA target module names."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA scale alpha/sqrt(r)."})
    max_steps: int = field(default=50, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=4, metadata={"help": "Per-device batch size."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate."})
    max_length: int = field(default=256, metadata={"help": "Token limit of prompt + response."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and init."})
    save_steps: int = field(default=25, metadata={"help": "Checkpoint interval (steps)."})

    def __post_init__(self):
        if self.method == "alignguard" and not self.fisher:
            raise ValueError("fisher: method 'alignguard' needs --fisher DIR (run `alignguard fisher` first)")
        if not 0 <= self.poison_ratio < 1:
            raise ValueError(f"poison_ratio: must be in [0, 1), got {self.poison_ratio}")
        for name in ("n_train", "lora_r", "max_steps", "batch_size", "grad_accum", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


def run_train(
    cfg: TrainRunConfig,
    ag_cfg: AlignGuardConfig | None = None,
    model=None,
    tokenizer=None,
    progress: bool = True,
    subspaces=None,
    extra_pairs: list[tuple[str, str]] | None = None,
) -> dict:
    """Train a LoRA adapter on the task mix; writes the adapter (+ AlignGuard state) to `cfg.out`.

    A checkpoint is saved every `save_steps`; calling this again with the same config resumes from the last one.
    `subspaces` overrides the ones in `cfg.fisher` (e.g. the random-subspace or full-spectrum EWC controls);
    `extra_pairs` are (prompt, response) pairs added to the task mix (e.g. refusal replay), shuffled with `seed`.

    Returns:
        A summary dict (steps, final task loss, step time, paths; also written to `<out>/train_summary.json`)
        plus `peft_model`, the trained model.
    """
    import time

    from transformers import Trainer, TrainerCallback

    from .data import PaddingCollator, pad_token_id, tokenize_example
    from .tasks import build_finetune_data, load_task

    if model is None:
        from .models import load_model_and_tokenizer

        model, tokenizer, _ = load_model_and_tokenizer(cfg.model)
    out = Path(cfg.out)
    task = load_task(cfg.task, "train", n=cfg.n_train, seed=cfg.seed)
    mix = build_finetune_data(task, poison_ratio=cfg.poison_ratio, seed=cfg.seed)
    pairs = [(ex.prompt, ex.response) for ex in mix] + list(extra_pairs or [])
    random.Random(cfg.seed).shuffle(pairs)
    features = [
        tokenize_example(tokenizer, p, r, cfg.max_length, index=i, min_response_tokens=cfg.max_length // 4)
        for i, (p, r) in enumerate(pairs)
    ]
    peft_model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.target_modules, cfg.lora_dropout, cfg.use_rslora)
    args = checkpointed_training_args(
        out / "checkpoints",
        cfg.max_steps,
        cfg.batch_size,
        cfg.learning_rate,
        cfg.seed,
        cfg.save_steps,
        progress,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type="constant",
    )
    times: list[float] = []

    class _StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    kwargs = dict(
        model=peft_model,
        args=args,
        train_dataset=features,
        data_collator=PaddingCollator(pad_token_id(tokenizer)),
        callbacks=[_StepTimer()],
    )
    if cfg.method == "alignguard":
        from .fisher import FisherState
        from .subspace import AlignmentSubspaces
        from .trainer import AlignGuardTrainer

        fisher_state = FisherState.load(cfg.fisher, model=peft_model) if cfg.fisher else None
        subspaces = subspaces if subspaces is not None else AlignmentSubspaces.load(cfg.fisher)
        trainer = AlignGuardTrainer(
            **kwargs, subspaces=subspaces, fisher_state=fisher_state, alignguard_config=ag_cfg or AlignGuardConfig()
        )
    else:
        trainer = Trainer(**kwargs)
    last = latest_checkpoint(out / "checkpoints")
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    trainer.save_model(str(out / "adapter"))
    tokenizer.save_pretrained(str(out / "adapter"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "method": cfg.method,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "last_logged_loss": losses[-1] if losses else None,
        "mean_step_seconds": sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else None,
        "n_examples": len(pairs),
        "n_extra": len(extra_pairs or []),
        "n_poison": sum(ex.kind == "poison" for ex in mix),
        "resumed_from": last.name if last else None,
        "log_history": trainer.state.log_history,
        "adapter": str(out / "adapter"),
    }
    atomic_write_json(out / "train_summary.json", summary)
    return {**summary, "peft_model": peft_model}


def checkpointed_training_args(
    output_dir, max_steps, batch_size, learning_rate, seed, save_steps, progress=True, **extra
):
    """`TrainingArguments` for our LoRA runs: seeded data order, a checkpoint every `save_steps` (only the last is
    kept), no external loggers, CPU when there is no CUDA device."""
    import torch
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        data_seed=seed,
        logging_steps=max(1, min(10, max_steps // 5)),
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,
        report_to="none",
        warmup_steps=0,
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest `checkpoint-N` folder under `directory` (what a re-run resumes from), or None."""
    ckpts = sorted(Path(directory).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return ckpts[-1] if ckpts else None
