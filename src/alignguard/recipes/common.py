"""Pipeline helpers the recipes share: LoRA construction, checkpointed TrainingArguments, resume lookup."""

from __future__ import annotations

from pathlib import Path

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


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
