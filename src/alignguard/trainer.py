"""AlignGuard training: a mixin over `transformers.Trainer` / `trl.SFTTrainer` that adds the AlignGuard terms.

    from alignguard import AlignGuardTrainer, AlignGuardConfig
    trainer = AlignGuardTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=ds,
                                subspaces=subspaces, alignguard_config=AlignGuardConfig(lambda_a=10))
    trainer.train()

The regulariser does not depend on the batch and the LoRA weights do not change within an accumulation
cycle, so it is added exactly once per optimizer step: on the micro-batch that syncs gradients, with a weight
that undoes the Trainer's 1/gradient_accumulation_steps loss scaling where the Trainer applies it (adding
reg/GA on every micro-batch would give the same gradient at GA times the cost). A `TrainerCallback` alone
cannot add a loss term, hence the `compute_loss` override (as TRL does for `router_aux_loss_coef`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from transformers import Trainer, TrainerCallback

from .config import AlignGuardConfig, FisherConfig, SubspaceConfig
from .distributed import full_parameters, regularizer_parameters
from .fisher import FisherState, estimate_fisher
from .io import atomic_write_json
from .projection import attach_projection_hooks, detach_projection_hooks, project_lora_weights_
from .regularizers import TERM_NAMES, AlignGuardRegularizer
from .subspace import AlignmentSubspaces, build_subspaces

ALIGNGUARD_CONFIG_FILE = "alignguard_config.json"


class _AlignGuardCallback(TrainerCallback):
    """Re-projects lora_B after each optimizer step (mode="project") and refreshes U on schedule."""

    def __init__(self, trainer: AlignGuardMixin):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        cfg = t.alignguard_config
        if cfg.refresh_every and state.global_step % cfg.refresh_every == 0:
            t.refresh_subspaces()
        if cfg.mode == "project":
            project_lora_weights_(t.model, t.subspaces)
        return control


class AlignGuardMixin:
    """Adds the AlignGuard loss, logging, projection, refresh and state saving to a HF Trainer subclass.

    Args (keyword-only, besides the base trainer's own):
        subspaces: `AlignmentSubspaces` (from `build_subspaces`).
        alignguard_config: `AlignGuardConfig`.
        fisher_state: the `FisherState` the subspaces came from (saved beside the adapter when given).
        alignment_data: batches of alignment data; required when `refresh_every` is set.
        fisher_config / subspace_config: settings used when refreshing.

    Upon completion of `__init__`, `self.regularizer` holds the grouped regulariser of `self.model`.
    """

    def __init__(
        self,
        *args,
        subspaces: AlignmentSubspaces,
        alignguard_config: AlignGuardConfig | None = None,
        fisher_state: FisherState | None = None,
        alignment_data=None,
        fisher_config: FisherConfig | None = None,
        subspace_config: SubspaceConfig | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.alignguard_config = alignguard_config or AlignGuardConfig()
        if self.alignguard_config.refresh_every and alignment_data is None:
            raise ValueError("refresh_every is set, so alignment_data (batches for the Fisher pass) is required")
        self.subspaces = subspaces
        self.fisher_state = fisher_state
        self.alignment_data = alignment_data
        self.fisher_config = fisher_config or FisherConfig(show_progress=False)
        # Refresh with the settings the given subspaces were built with, unless told otherwise.
        built_with = subspaces.metadata.get("config")
        self.subspace_config = subspace_config or (SubspaceConfig(**built_with) if built_with else SubspaceConfig())
        self.regularizer = AlignGuardRegularizer(self.model, subspaces, self.alignguard_config)
        self._ag_metrics: dict[str, list] = defaultdict(list)
        self._ag_hooks: list = []
        self.add_callback(_AlignGuardCallback(self))
        if self.alignguard_config.mode == "project":
            project_lora_weights_(self.model, subspaces)
            self._ag_hooks = attach_projection_hooks(self.model, subspaces)

    def refresh_subspaces(self) -> None:
        """Recompute the Fisher factor at the current weights and rebuild U (the refresh schedule)."""
        task_factors = self.subspaces.task_factors
        fisher_config = self.fisher_config
        if self.alignguard_config.alignment_input == "kfac" and not fisher_config.input_factor:
            fisher_config = replace(fisher_config, input_factor=True)  # R_A needs A_in at the new weights too
        self.fisher_state = estimate_fisher(self.model, self.alignment_data, fisher_config)
        self.subspaces = build_subspaces(self.fisher_state, self.subspace_config)
        self.subspaces.task_factors = task_factors
        self.regularizer = AlignGuardRegularizer(self.model, self.subspaces, self.alignguard_config)
        if self._ag_hooks:
            detach_projection_hooks(self._ag_hooks)
            self._ag_hooks = attach_projection_hooks(self.model, self.subspaces)

    def _ga_weight(self, num_items_in_batch) -> float:
        """Weight that makes reg contribute once, unscaled, per optimizer step (mirrors Trainer.training_step)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
                getattr(self, "compute_loss_func", None) is not None
            )
        from accelerate.utils import DistributedType

        if scaled or self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            return 1.0
        return float(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training or not self.accelerator.sync_gradients:
            return result
        loss = result[0] if return_outputs else result
        # Detached tensors, turned into floats only when logging: a .item() per term per step would force a
        # device synchronisation on every step on a GPU.
        self._ag_metrics["task_loss"].append(loss.detach())
        # Looked up per call: engines that wrap the model after __init__ (FSDP2) replace the parameter objects.
        with full_parameters(regularizer_parameters(self.regularizer)):  # gathers ZeRO-3-partitioned weights
            terms = self.regularizer()
        for key in (*TERM_NAMES, "total"):
            self._ag_metrics[f"reg_{key}"].append(terms[key].detach())
        loss = loss + terms["total"].to(loss.dtype) * self._ga_weight(num_items_in_batch)
        return (loss, *result[1:]) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._ag_metrics and "loss" in logs:
            logs.update({k: float(sum(v)) / len(v) for k, v in self._ag_metrics.items() if v})
            self._ag_metrics.clear()
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        out = Path(output_dir or self.args.output_dir)
        save_alignguard_state(out, self.subspaces, self.alignguard_config, self.fisher_state)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.alignguard_config.mode == "project":
                project_lora_weights_(self.model, self.subspaces)


def save_alignguard_state(
    directory: str | Path,
    subspaces: AlignmentSubspaces,
    config: AlignGuardConfig,
    fisher_state: FisherState | None = None,
) -> None:
    """Write subspaces (+ Fisher state) and the AlignGuard config beside an adapter."""
    directory = Path(directory)
    subspaces.save(directory)
    if fisher_state is not None:
        fisher_state.save(directory)
    atomic_write_json(directory / ALIGNGUARD_CONFIG_FILE, config.to_dict())


def load_alignguard_config(directory: str | Path) -> AlignGuardConfig:
    return AlignGuardConfig(**json.loads((Path(directory) / ALIGNGUARD_CONFIG_FILE).read_text()))


class AlignGuardTrainer(AlignGuardMixin, Trainer):
    """`transformers.Trainer` with the AlignGuard loss."""


def __getattr__(name):
    # trl is imported only when its trainer is asked for: importing it pulls in much more than Trainer.
    if name == "AlignGuardSFTTrainer":
        from trl import SFTTrainer

        cls = type(
            "AlignGuardSFTTrainer",
            (AlignGuardMixin, SFTTrainer),
            {"__doc__": "`trl.SFTTrainer` with the AlignGuard loss.", "__module__": __name__},
        )
        globals()[name] = cls
        return cls
    raise AttributeError(name)
