"""Recipe of `alignguard train`: a LoRA adapter on the task mix, plain or with the AlignGuard loss.

Decides where files go, which data is used by default and how a run resumes; the loss itself is in
`alignguard.trainer` and the components it uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import AlignGuardConfig
from ..io import atomic_write_json
from .common import DEFAULT_TARGETS, add_lora, checkpointed_training_args, latest_checkpoint


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
    overwrite: bool = field(
        default=False, metadata={"help": "Delete what --out holds (another run or other settings) and start afresh."}
    )

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

    from ..data import PaddingCollator, pad_token_id, tokenize_example
    from ..tasks import build_finetune_data, load_task

    if model is None:
        from ..models import load_model_and_tokenizer

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
        from ..fisher import FisherState
        from ..subspace import AlignmentSubspaces
        from ..trainer import AlignGuardTrainer

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
