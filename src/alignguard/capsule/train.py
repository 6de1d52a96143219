"""Staged training for R-Capsule with resumable checkpoints.

Stage 1 (`cot_steps`): plain text, question -> "Plan: ... Steps: ... Answer: N" (full chain of thought), plus the
direct format question -> "Answer: N" so the same weights can serve the no-CoT control.
Stage 2 (`capsule_steps`): question -> capsule -> "Steps: ... Answer: N", plus `recon_lambda` x reconstruction of
the plan from the capsule alone.

Batches, learning rates and dropout are all functions of `(seed, step)` rather than of iterator or RNG state, so a
run resumed from a checkpoint reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import CapsuleTrainConfig
from .data import CapsuleExample, collate
from .model import CapsuleModel, load_weights, save_weights

CHECKPOINTS_DIR = "checkpoints"
STAGE1_DIR = "stage1"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of `step`: consecutive slices of a per-epoch permutation seeded by `(seed, epoch)`."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[offset]))
    return out


def build_optimizer(model: CapsuleModel, cfg: CapsuleTrainConfig) -> torch.optim.AdamW:
    """AdamW over the LM's trainable params (LoRA or all) and the capsule params (own learning rate).

    The capsule params get no gradient in stage 1; AdamW skips params whose `.grad` is `None`, so one optimizer
    serves both stages and its state survives the stage switch.
    """
    capsule_ids = {id(p) for p in model.capsule_parameters()}
    lm_params = [p for p in model.parameters() if p.requires_grad and id(p) not in capsule_ids]
    groups = [
        {"params": lm_params, "lr": cfg.learning_rate, "base_lr": cfg.learning_rate},
        {
            "params": model.capsule_parameters(),
            "lr": cfg.capsule_learning_rate or cfg.learning_rate,
            "base_lr": cfg.capsule_learning_rate or cfg.learning_rate,
        },
    ]
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, cfg: CapsuleTrainConfig, step: int) -> None:
    scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * scale


def stage1_checkpoint_name(cfg: CapsuleTrainConfig) -> str:
    """Folder name (under `checkpoints/`) of the resumable checkpoint at the end of stage 1."""
    return f"step-{cfg.cot_steps:07d}"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete step checkpoint with the highest step under `out_dir/checkpoints`, or `None`."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    done = [p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(model, optimizer, out_dir: Path, step: int, history: list, cfg: CapsuleTrainConfig) -> Path:
    root = out_dir / CHECKPOINTS_DIR
    final = root / f"step-{step:07d}"  # zero-padded so names sort like steps
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_STATE)
    # The trainer state is written last: a folder without it is an interrupted save and is never resumed from.
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, "history": history}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    steps = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[: -cfg.save_total_limit]:
        # The end-of-stage-1 checkpoint is kept: other runs (e.g. the lambda = 0 control) start stage 2 from it.
        if old.name != stage1_checkpoint_name(cfg):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _step_losses(
    model: CapsuleModel, tokenizer, examples: list[CapsuleExample], stage: int, cfg: CapsuleTrainConfig
) -> dict[str, torch.Tensor]:
    dev = model.device
    if stage == 1:
        cot = collate(tokenizer, examples, "cot", cfg.max_length)
        direct = collate(tokenizer, examples, "direct", cfg.max_length)
        cot_loss = model.text_loss(_to(cot, dev))
        direct_loss = model.text_loss(_to(direct, dev))
        return {"loss": cot_loss + direct_loss, "cot_loss": cot_loss, "direct_loss": direct_loss}
    batch = collate(tokenizer, examples, "capsule", cfg.max_length, cfg.capsule_trace)
    return model.capsule_losses(_to(batch, dev), cfg.recon_lambda)


def _to(batch, device):
    for name, value in vars(batch).items():
        setattr(batch, name, value.to(device))
    return batch


def train_capsule(
    model: CapsuleModel,
    tokenizer,
    train_examples: list[CapsuleExample],
    cfg: CapsuleTrainConfig,
    out_dir: str | Path,
    resume: bool = True,
    stop_after: int | None = None,
    logging_sink: Callable[[str], None] | None = print,
) -> dict:
    """Run (or resume) the staged schedule and save the final weights to `out_dir`.

    Args:
        model (`CapsuleModel`): The wrapper; trained in place.
        tokenizer: Its tokenizer.
        train_examples (`list[CapsuleExample]`): Training problems.
        cfg (`CapsuleTrainConfig`): Schedule, optimiser and checkpoint settings.
        out_dir (`str` or `Path`): Output folder; step checkpoints go to `out_dir/checkpoints/step-*`, the end of
            stage 1 to `out_dir/stage1` (the full-CoT / no-CoT control weights), the final weights to `out_dir`.
        resume (`bool`): Continue from the latest complete checkpoint in `out_dir` when there is one.
        stop_after (`int`, *optional*): Stop after this global step (after checkpointing it); simulates an
            interruption in tests.
        logging_sink (`Callable[[str], None]`, *optional*): Where loss lines go; `None` silences them.

    Returns:
        `dict` with `history` (per-step losses), `resumed_from` (a step or `None`), `train_runtime_s` and `done`.

    Upon completion, `out_dir` holds `capsule.safetensors` plus `adapter/` or `model.safetensors`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = cfg.cot_steps + cfg.capsule_steps
    optimizer = build_optimizer(model, cfg)
    start, history, resumed_from = 0, [], None
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        load_weights(model, ckpt)
        optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER_STATE, map_location=model.device, weights_only=True))
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        start, history, resumed_from = state["step"], state["history"], state["step"]
        if logging_sink:
            logging_sink(f"resumed from {ckpt} (step {start}/{total})")
    if cfg.cot_steps == 0 and start == 0:
        save_weights(model, out / STAGE1_DIR)  # no stage 1: the CoT controls run on the untouched base
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=total, initial=start, desc="capsule train", disable=not cfg.show_progress_bar)
    # Per-step reseeding below must not leak into the caller's global RNG state.
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        try:
            for step in range(start, total):
                stage = 1 if step < cfg.cot_steps else 2
                bar.set_description(f"stage {stage} ({'full CoT' if stage == 1 else 'capsule'})")
                torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout depends on the step only (resume-exact)
                idx = batch_indices(len(train_examples), cfg.batch_size, cfg.seed, step)
                _set_lr(optimizer, cfg, step)
                losses = _step_losses(model, tokenizer, [train_examples[i] for i in idx], stage, cfg)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm
                    )
                optimizer.step()
                record = {"step": step + 1, "stage": stage, **{k: float(v.detach()) for k, v in losses.items()}}
                history.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()})
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                if logging_sink and ((step + 1) % cfg.logging_steps == 0 or step + 1 == total):
                    logging_sink(
                        " ".join(
                            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in history[-1].items()
                            if v is not None
                        )
                    )
                at_stage_end = step + 1 in (cfg.cot_steps, total)
                if step + 1 == cfg.cot_steps:
                    save_weights(model, out / STAGE1_DIR)
                if (step + 1) % cfg.save_steps == 0 or at_stage_end or step + 1 == stop_after:
                    _save_checkpoint(model, optimizer, out, step + 1, history, cfg)
                if stop_after is not None and step + 1 >= stop_after:
                    return {
                        "history": history,
                        "resumed_from": resumed_from,
                        "done": False,
                        "train_runtime_s": time.perf_counter() - t0,
                    }
        finally:
            bar.close()
    save_weights(model, out)
    return {
        "history": history,
        "resumed_from": resumed_from,
        "done": True,
        "train_runtime_s": time.perf_counter() - t0,
    }
