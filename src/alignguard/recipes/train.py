"""Recipe of `alignguard train`: a LoRA adapter on the task mix, plain or with the AlignGuard loss.

Decides where files go, which data is used by default and how a run resumes; the loss itself is in
`alignguard.trainer` and the components it uses.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import AlignGuardConfig
from ..config_values import require_at_least, require_positive
from ..io import atomic_write_json
from .common import DEFAULT_TARGETS, add_lora, checkpointed_training_args, latest_checkpoint, restore_final_checkpoint


@dataclass
class TrainRunConfig:
    """Task fine-tuning with LoRA, plain or with the AlignGuard loss (`alignguard train`).

    Args:
        model: model folder, .gguf, registry name or tiny name.
        out: output folder (adapter, AlignGuard state, config.yaml, checkpoints/).
        method: `lora` (plain PEFT LoRA) or `alignguard`.
        fisher: folder written by `alignguard fisher` (needed by `alignguard`).
        task: downstream task (`bbc_topic`, `arithmetic` or `word_problems`).
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
    task: Literal["bbc_topic", "arithmetic", "word_problems", "word_problems_easy"] = field(
        default="bbc_topic", metadata={"help": "Downstream task (word_problems_easy: one-step, numbers 2..20)."}
    )
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
        if not 0 <= self.poison_ratio < 1:
            raise ValueError(f"poison_ratio: must be in [0, 1), got {self.poison_ratio}")
        require_at_least(
            self, ("n_train", "lora_r", "max_steps", "batch_size", "grad_accum", "save_steps", "max_length")
        )
        require_positive(self, ("learning_rate", "lora_alpha"))
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if not self.target_modules:
            raise ValueError("target_modules: give at least one module name (e.g. q_proj v_proj)")
        if self.method == "alignguard" and not self.fisher:  # last: a bad value above is the first thing to fix
            raise ValueError("fisher: method 'alignguard' needs --fisher DIR (run `alignguard fisher` first)")


TRAIN_SETTINGS = "train_settings.json"
TRAIN_SUMMARY = "train_summary.json"
STEP_TIMES = "step_times.json"
# Names this Python process in the summaries of the trainings it timed: step times of two rows compare only when
# one process (one machine state) timed both (`report.compare_table` marks the others).
PROCESS_ID = uuid.uuid4().hex


class TrainSettingsMismatch(ValueError):
    """The output folder holds a training run made with other settings (resuming it would mix the two)."""


def train_settings(
    cfg: TrainRunConfig, ag_cfg: AlignGuardConfig | None, subspaces=None, extra_pairs=None, method_settings=None
) -> dict:
    """What a training run's outputs depend on (recorded in `<out>/train_settings.json`): the run config, the
    AlignGuard config and the Fisher folder's contents (for `alignguard`), override subspaces, extra pairs and the
    caller's `method_settings` (a peer's own options, e.g. AsFT's lambda)."""
    from .common import file_digest, plain_settings, settings_key

    settings = plain_settings({"train": cfg})
    if cfg.method == "alignguard":
        settings["alignguard"] = plain_settings({"c": ag_cfg or AlignGuardConfig()})["c"]
        fisher = Path(cfg.fisher)
        settings["fisher_files"] = {n: file_digest(fisher / n) for n in ("fisher.json", "subspaces.json")}
        if subspaces is not None:
            settings["subspaces"] = _subspaces_fingerprint(subspaces)
    if extra_pairs:
        settings["extra_pairs"] = settings_key({"pairs": [list(p) for p in extra_pairs]})
    if method_settings:
        settings["method_settings"] = method_settings
    return settings


def _subspaces_fingerprint(subspaces) -> str:
    """Cheap fingerprint of override subspaces: shapes and sums of every basis and spectrum (no full hash)."""
    from .common import settings_key

    rows = []
    tables = {"align": subspaces.subspaces, "task": subspaces.task_factors, "input": subspaces.input_factors}
    for kind, table in tables.items():
        for name in sorted(table):
            sub = table[name]
            rows.append([kind, name, list(sub.basis.shape), float(sub.basis.double().sum()), float(sub.eigvals.sum())])
    return settings_key({"subspaces": rows})


def _check_train_settings(out: Path, settings: dict) -> bool:
    """Record `settings` for a fresh folder; for one already trained into, refuse other settings.

    Returns whether the folder holds a finished run with these settings (train_summary.json is there).
    """
    from .common import legacy_outputs_match, settings_diff

    path = out / TRAIN_SETTINGS
    started = (out / "checkpoints").is_dir() or (out / TRAIN_SUMMARY).is_file() or (out / "adapter").is_dir()
    old = json.loads(path.read_text())["settings"] if path.is_file() else None
    if old is None and started and legacy_outputs_match(out):
        old = settings  # a run from before train_settings.json, by the CLI with these same settings (run.json)
        atomic_write_json(path, {"settings": settings})
    if old is not None and old != settings and started:
        raise TrainSettingsMismatch(
            f"{path}: {out} holds a training run with other settings ({'; '.join(settings_diff(old, settings))}); "
            "resuming it would mix the two. Use another --out, or --overwrite true to start afresh"
        )
    if old is None:
        atomic_write_json(path, {"settings": settings})
    return old is not None and (out / TRAIN_SUMMARY).is_file() and (out / "adapter").is_dir()


def alignment_batches(fisher_dir: str | Path, tokenizer):
    """The Fisher pass's batches, rebuilt from `<fisher>/fisher_data.json` with the batch size and length limit
    recorded in `<fisher>/fisher_batches.json` (or, for folders made before that file, `<fisher>/config.yaml`)."""
    from ..data import make_batches

    fisher_dir = Path(fisher_dir)
    data_path, meta_path = fisher_dir / "fisher_data.json", fisher_dir / "fisher_batches.json"
    if not data_path.is_file():
        raise FileNotFoundError(
            f"{data_path}: no alignment data for --refresh_every; re-run `alignguard fisher --out {fisher_dir}`"
        )
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
    elif (fisher_dir / "config.yaml").is_file():
        import yaml

        run = (yaml.safe_load((fisher_dir / "config.yaml").read_text()) or {}).get("run", {})
        meta = {"batch_size": run.get("batch_size", 8), "max_length": run.get("max_length", 256)}
    else:
        raise FileNotFoundError(
            f"{meta_path}: the Fisher pass's batch size and max_length are not recorded (nor in config.yaml); "
            f"re-run `alignguard fisher --out {fisher_dir}`"
        )
    pairs = [(r["prompt"], r["response"]) for r in json.loads(data_path.read_text())]
    max_length = int(meta["max_length"])
    return make_batches(
        tokenizer,
        pairs,
        batch_size=int(meta["batch_size"]),
        max_length=max_length,
        min_response_tokens=meta.get("min_response_tokens", max_length // 4),
    )


def alignment_trainer_factory(trainer_cls, config_kw: str, fisher_dir: str | Path, tokenizer, config) -> tuple:
    """For a peer whose Trainer subclass steps on the Fisher pass's alignment batches (gradient surgery, Lisa):
    the batches, and a `trainer_factory` for `run_train` that hands them and `config` (as `config_kw`) over.
    Returns `(info, trainer_factory)`; `info` records the options and how many alignment batches there are."""
    batches = alignment_batches(fisher_dir, tokenizer)
    info = {**config.to_dict(), "alignment_batches": len(batches)}

    def trainer_factory(**kwargs):
        return trainer_cls(**kwargs, alignment_batches=batches, **{config_kw: config})

    return info, trainer_factory


def _load_finished(out: Path, model, log) -> dict:
    """The summary of a finished run (skipped), with `peft_model` = the saved adapter on `model` (None without)."""
    summary = json.loads((out / TRAIN_SUMMARY).read_text())
    log(f"[train] {out}: finished earlier with the same settings; skipped ({TRAIN_SUMMARY} kept)")
    peft_model = None
    if model is not None:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(out / "adapter"), is_trainable=False)
    return {**summary, "skipped": True, "peft_model": peft_model}


def _logged_mean_loss(log_history: list[dict]) -> float | None:
    """Mean training loss over the logged steps (each logged value averages the steps since the previous one)."""
    total, steps, last = 0.0, 0, 0
    for h in log_history:
        if "loss" in h and "step" in h:
            total += h["loss"] * (h["step"] - last)
            steps += h["step"] - last
            last = h["step"]
    return total / steps if steps else None


def run_train(
    cfg: TrainRunConfig,
    ag_cfg: AlignGuardConfig | None = None,
    model=None,
    tokenizer=None,
    progress: bool = True,
    subspaces=None,
    extra_pairs: list[tuple[str, str]] | None = None,
    log=print,
    trainer_factory=None,
    method_settings: dict | None = None,
    example_filter=None,
) -> dict:
    """Train a LoRA adapter on the task mix; writes the adapter (+ AlignGuard state) to `cfg.out`.

    A checkpoint is saved every `save_steps`; calling this again with the same settings resumes from the newest
    complete one, and a finished run is skipped (its summary is returned, nothing is rewritten). Settings are
    recorded in `<out>/train_settings.json`; a folder trained with other settings is refused
    (`TrainSettingsMismatch`, naming the differing fields).
    `subspaces` overrides the ones in `cfg.fisher` (e.g. the random-subspace or full-spectrum EWC controls);
    `extra_pairs` are (prompt, response) pairs added to the task mix (e.g. refusal replay), shuffled with `seed`.
    With `ag_cfg.refresh_every`, the subspaces are re-estimated during training on the Fisher pass's own data
    (`alignment_batches`); a resumed run continues from the subspaces saved in its checkpoint.
    `trainer_factory(**trainer_kwargs)`, for `method="lora"`, builds the Trainer instead of `transformers.Trainer`
    (a plain-LoRA method with its own loss term: `recipes.asft.AsftTrainer`); `method_settings` (its options)
    join the recorded settings, so a resume with other options is refused.
    `example_filter(mix, model, tokenizer) -> (kept mix, report)` screens the task mix before LoRA is added (the
    self-screen rows, `alignguard.self_screen`); its report is kept in the summary as `screen`.

    Returns:
        A summary dict (steps, task loss, step time, unprotected layers, paths; also written to
        `<out>/train_summary.json`) plus `peft_model`, the trained model (None for a skipped run called without
        `model`) and `skipped`.
    """
    import time

    from transformers import Trainer, TrainerCallback

    from ..data import PaddingCollator, pad_token_id, tokenize_example
    from ..tasks import build_finetune_data, load_task

    out = Path(cfg.out)
    ag_cfg = ag_cfg or AlignGuardConfig()
    if _check_train_settings(out, train_settings(cfg, ag_cfg, subspaces, extra_pairs, method_settings)):
        return _load_finished(out, model, log)
    if model is None:
        from ..models import load_model_and_tokenizer

        model, tokenizer, _ = load_model_and_tokenizer(cfg.model)
    task = load_task(cfg.task, "train", n=cfg.n_train, seed=cfg.seed)
    mix = build_finetune_data(task, poison_ratio=cfg.poison_ratio, seed=cfg.seed)
    screen = None
    if example_filter is not None:  # before LoRA is added: the screen asks the model as it is (self_screen rows)
        mix, screen = example_filter(mix, model, tokenizer)
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
    last = latest_checkpoint(out / "checkpoints", log=log)
    resumed_step = json.loads((last / "trainer_state.json").read_text())["global_step"] if last else 0
    # Step times survive a resume: kept per step in step_times.json, cut back to the checkpoint's step.
    times_path = out / STEP_TIMES
    old_times = json.loads(times_path.read_text()) if last and times_path.is_file() else {}
    times: dict[str, float] = {k: v for k, v in old_times.items() if int(k) <= resumed_step}

    class _StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **k):
            times[str(state.global_step)] = time.perf_counter() - self.t0

        def on_save(self, args, state, control, **k):
            atomic_write_json(times_path, times)

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

        fisher_state = FisherState.load(cfg.fisher, model=peft_model)
        subspaces = subspaces if subspaces is not None else AlignmentSubspaces.load(cfg.fisher)
        alignment_data = None
        if ag_cfg.refresh_every:
            alignment_data = alignment_batches(cfg.fisher, tokenizer)
            if last is not None and (last / "subspaces.json").is_file():
                # The refreshed subspaces of the checkpoint, not the initial ones, continue the run.
                subspaces = AlignmentSubspaces.load(last)
                if (last / "fisher.json").is_file():
                    fisher_state = FisherState.load(last, model=peft_model)
        trainer = AlignGuardTrainer(
            **kwargs,
            subspaces=subspaces,
            fisher_state=fisher_state,
            alignment_data=alignment_data,
            alignguard_config=ag_cfg,
        )
    else:
        trainer = (trainer_factory or Trainer)(**kwargs)
    if last is not None and resumed_step >= cfg.max_steps:
        # Killed after the last checkpoint: nothing left to train (the Trainer would run one step too many).
        restore_final_checkpoint(trainer, peft_model, last)
        training_loss = None
    else:
        training_loss = trainer.train(resume_from_checkpoint=str(last) if last else None).training_loss
    atomic_write_json(times_path, times)
    trainer.save_model(str(out / "adapter"))
    tokenizer.save_pretrained(str(out / "adapter"))
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    # The Trainer's training_loss averages only the steps of this call (0.0 when resumed at the last step).
    train_loss = training_loss if not last else _logged_mean_loss(history)
    step_times = [times[k] for k in sorted(times, key=int)]
    unprotected = getattr(getattr(trainer, "regularizer", None), "unprotected", None)
    summary = {
        "method": cfg.method,
        "steps": trainer.state.global_step,
        "train_loss": train_loss,
        "train_loss_source": "trainer" if not last else "log_history",
        "last_logged_loss": losses[-1] if losses else None,
        # The first step carries one-off costs (allocation, compilation); left out when there are others.
        "mean_step_seconds": sum(step_times[1:]) / (len(step_times) - 1) if len(step_times) > 1 else None,
        # None when resumed: the step times then come from more than one process.
        "step_times_process": None if last else PROCESS_ID,
        "n_examples": len(pairs),
        "n_extra": len(extra_pairs or []),
        "n_poison": sum(ex.kind == "poison" for ex in mix),
        "screen": screen,
        "resumed_from": last.name if last else None,
        "n_unprotected_layers": len(unprotected) if unprotected is not None else None,
        "unprotected_layers": list(unprotected) if unprotected is not None else None,
        "log_history": history,
        "adapter": str(out / "adapter"),
    }
    atomic_write_json(out / TRAIN_SUMMARY, summary)
    return {**summary, "skipped": False, "peft_model": peft_model}
