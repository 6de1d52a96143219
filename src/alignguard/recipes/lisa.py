"""Lisa as a training recipe: a HF Trainer that alternates alignment and fine-tune states with a proximal term
(`alignguard.lisa`).

Used by the `lisa` rows of `alignguard compare` through `run_train(trainer_factory=...)`. The alignment data is
the Fisher pass's (<fisher>/fisher_data.json: unsafe prompts with the aligned model's refusals, the batches that
`--refresh_every` and gradient surgery use), so a Lisa row reads no data beyond what the row already has. In an
alignment-state step every micro-batch the Trainer hands over is replaced by the next alignment batch (mean loss
over its tokens), so the task batches of that step are skipped, as in the paper's loop.

The anchor w_switch (the trainable weights at the last switch of state) is saved beside every checkpoint
(`lisa_anchor.safetensors`, written before the Trainer's state, so a checkpoint the run resumes from has it) and
loaded on resume. The state itself follows from the step number. `lisa_proximal` (the unweighted
||w - w_switch||²) and `lisa_alignment_share` (the share of optimizer steps in the alignment state) are logged
beside `loss`. Sharded parameters (DeepSpeed ZeRO, FSDP) are refused: the anchor must be the whole weight.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from ..lisa import ALIGNMENT, LisaConfig, lisa_phase, proximal_term
from .step_terms import StepTermsMixin

ANCHOR_FILE = "lisa_anchor.safetensors"


class LisaMixin(StepTermsMixin):
    """Adds Lisa's two states and proximal term to a HF Trainer subclass (keyword-only `alignment_batches`,
    `lisa_config`)."""

    def __init__(self, *args, alignment_batches: list[dict], lisa_config: LisaConfig | None = None, **kw):
        super().__init__(*args, **kw)
        if not alignment_batches:
            raise ValueError("lisa: no alignment batches (the Fisher folder's fisher_data.json is empty)")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "lisa keeps a copy of the whole trainable weights as its anchor; DeepSpeed and FSDP shard them. Run "
                "the lisa rows without them (DDP is fine)"
            )
        self.lisa_config = lisa_config or LisaConfig()
        self.alignment_batches = alignment_batches
        self._next_batch = 0
        self._anchor: list[torch.Tensor] | None = None
        self._step: int | None = None  # the optimizer step whose micro-batches are running
        self._phase = ALIGNMENT

    def _named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _begin_step(self) -> None:
        """Enter optimizer step `global_step`: its state, and a new anchor where the state switches."""
        step = self.state.global_step
        self._phase = lisa_phase(step, self.lisa_config)
        switched = step > 0 and self._phase != lisa_phase(step - 1, self.lisa_config)
        if self._anchor is None or switched:
            self._anchor = [p.detach().clone() for _, p in self._named_trainable()]
        self._step = step

    def _alignment_batch(self) -> dict:
        batch = self.alignment_batches[self._next_batch % len(self.alignment_batches)]
        self._next_batch += 1
        return batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._step != self.state.global_step:
            self._begin_step()
        if self._phase == ALIGNMENT:
            # The task's token count does not describe this batch: without it the loss is the batch mean,
            # divided by the accumulation steps like any micro-batch's.
            inputs, num_items_in_batch = self._alignment_batch(), None
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training or not self.accelerator.sync_gradients or self._anchor is None:
            return result
        proximal = proximal_term([p for _, p in self._named_trainable()], self._anchor)
        self._log_step("lisa_proximal", proximal.detach())
        self._log_step("lisa_alignment_share", torch.tensor(float(self._phase == ALIGNMENT)))
        warmup = self.lisa_config.lisa_warmup_fraction * self.state.max_steps
        if self.lisa_config.lisa_rho > 0 and self.state.global_step >= warmup:
            weight = 0.5 * self.lisa_config.lisa_rho
            return self._add_step_term(result, return_outputs, num_items_in_batch, weight, proximal)
        return result

    def _save_checkpoint(self, model, trial):
        self._in_checkpoint = True  # `_save` below runs inside, before the Trainer writes its state
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        # Only checkpoints carry the anchor: the final adapter folder stays a plain PEFT adapter.
        if self._anchor is None or not self.args.should_save or not getattr(self, "_in_checkpoint", False):
            return
        out = Path(output_dir or self.args.output_dir)
        names = [n for n, _ in self._named_trainable()]
        tmp = out / f".{ANCHOR_FILE}.tmp"
        save_file({n: a.detach().contiguous().cpu() for n, a in zip(names, self._anchor, strict=True)}, str(tmp))
        os.replace(tmp, out / ANCHOR_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / ANCHOR_FILE
        if not path.is_file():  # a checkpoint from before this file existed: anchor at the resumed weights
            return
        saved = load_file(str(path))
        missing = [n for n, _ in self._named_trainable() if n not in saved]
        if missing:
            raise ValueError(
                f"{path}: holds no anchor for {missing[:3]}: the checkpoint is from another adapter layout; "
                "delete the run folder's checkpoints (or pass --overwrite) to start the row afresh"
            )
        self._anchor = [saved[n].to(p.device) for n, p in self._named_trainable()]


class LisaTrainer(LisaMixin, Trainer):
    """`transformers.Trainer` with Lisa's bi-state optimisation."""


def prepare_lisa(fisher_dir: str | Path, tokenizer, config: LisaConfig) -> tuple[dict, Callable]:
    """The alignment batches (from the Fisher folder) and a `trainer_factory` for `run_train`: see
    `recipes.train.alignment_trainer_factory`."""
    from .train import alignment_trainer_factory

    return alignment_trainer_factory(LisaTrainer, "lisa_config", fisher_dir, tokenizer, config)
