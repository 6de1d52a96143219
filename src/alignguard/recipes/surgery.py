"""Gradient surgery as a training recipe: a HF Trainer that projects the conflicting part of the task gradient off
the alignment-loss gradient before each optimizer step (`alignguard.gradient_surgery`).

Used by the `surgery` rows of `alignguard compare` through `run_train(trainer_factory=...)`. The alignment loss
is the causal-LM loss of the Fisher pass's alignment data (<fisher>/fisher_data.json: unsafe prompts with
refusals, the same batches `--refresh_every` uses), so no data beyond what the row already has is read. Its
gradient is taken with `torch.autograd.grad` on the trainable parameters (the task gradient in `.grad` is not
touched), once every `surgery_every` optimizer steps, on the micro-batch that completes the step, after the
task gradient is fully accumulated and before the Trainer clips it. `surgery_conflict` (the share of steps where
the task gradient would have raised the alignment loss) and `surgery_cosine` are logged beside `loss`.

Gradients that live outside `.grad` (DeepSpeed ZeRO) or are sharded (FSDP) are refused: the inner product must
be over the whole gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer

from ..gradient_surgery import SurgeryConfig, project_out_conflict_
from .step_terms import StepTermsMixin


class SurgeryMixin(StepTermsMixin):
    """Adds the gradient surgery to a HF Trainer subclass (keyword-only `alignment_batches`, `surgery_config`)."""

    def __init__(self, *args, alignment_batches: list[dict], surgery_config: SurgeryConfig | None = None, **kw):
        super().__init__(*args, **kw)
        if not alignment_batches:
            raise ValueError("gradient surgery: no alignment batches (the Fisher folder's fisher_data.json is empty)")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "gradient surgery needs the whole gradient in .grad; DeepSpeed and FSDP shard it. Run the "
                "surgery rows without them (DDP is fine)"
            )
        self.surgery_config = surgery_config or SurgeryConfig()
        self.alignment_batches = alignment_batches
        self._next_batch = 0
        self._ref: list[torch.Tensor] | None = None

    def _trainable(self, model) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def alignment_gradient(self, model) -> list[torch.Tensor]:
        """The gradient of the alignment loss (mean over `surgery_batches` batches) w.r.t. the trainable
        parameters, without touching their `.grad`."""
        params = self._trainable(model)
        total = [torch.zeros_like(p) for p in params]
        n = self.surgery_config.surgery_batches
        for _ in range(n):
            batch = self.alignment_batches[self._next_batch % len(self.alignment_batches)]
            self._next_batch += 1
            batch = {k: v.to(self.args.device) for k, v in batch.items()}
            loss = model(**batch).loss
            for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                if g is not None:
                    acc.add_(g.detach(), alpha=1.0 / n)
        return total

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the task gradient of this optimizer step is complete
            if self._ref is None or self.state.global_step % self.surgery_config.surgery_every == 0:
                self._ref = self.alignment_gradient(model)
            params = self._trainable(model)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            info = project_out_conflict_(grads, self._ref)
            for p, g in zip(params, grads, strict=True):
                if p.grad is None and info["conflict"]:
                    p.grad = g
            self._log_step("surgery_conflict", float(info["conflict"]))
            self._log_step("surgery_cosine", info["cosine"])
        return loss


class SurgeryTrainer(SurgeryMixin, Trainer):
    """`transformers.Trainer` with gradient surgery against the alignment loss."""


def prepare_surgery(fisher_dir: str | Path, tokenizer, config: SurgeryConfig) -> tuple[dict, Callable]:
    """The alignment batches (from the Fisher folder) and a `trainer_factory` for `run_train`: see
    `recipes.train.alignment_trainer_factory`."""
    from .train import alignment_trainer_factory

    return alignment_trainer_factory(SurgeryTrainer, "surgery_config", fisher_dir, tokenizer, config)
