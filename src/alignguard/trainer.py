"""AlignGuard training: a mixin over `transformers.Trainer` / `trl.SFTTrainer` that adds the AlignGuard terms.

    from alignguard import AlignGuardTrainer, AlignGuardConfig
    trainer = AlignGuardTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=ds,
                                subspaces=subspaces, alignguard_config=AlignGuardConfig(lambda_a=10))
    trainer.train()

The regulariser does not depend on the batch and the LoRA weights do not change within an accumulation
cycle, so it is added exactly once per optimizer step: on the micro-batch that syncs gradients, with a weight
that undoes the Trainer's 1/gradient_accumulation_steps loss scaling where the Trainer applies it, DeepSpeed
included (adding reg/GA on every micro-batch would give the same gradient at GA times the cost). A
`TrainerCallback` alone cannot add a loss term, hence the `compute_loss` override (as TRL does for
`router_aux_loss_coef`). The logged `task_loss` is the optimizer step's task loss counted as the Trainer's `loss`
counts it, so `loss == task_loss + reg_total`. A NaN/inf task loss or term stops training
(`NonFiniteLossError`) before it reaches the optimizer.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .config import AlignGuardConfig, FisherConfig, SubspaceConfig
from .distributed import full_parameters, regularizer_parameters
from .fisher import FisherState, estimate_fisher
from .io import atomic_write_json
from .projection import SubspaceProjector, detach_projection_hooks
from .regularizers import TERM_NAMES, AlignGuardRegularizer
from .subspace import AlignmentSubspaces, build_subspaces

ALIGNGUARD_CONFIG_FILE = "alignguard_config.json"
# Config fields renamed since older Fisher states / subspaces were written (old name -> new name).
FISHER_CONFIG_RENAMES = {"mode": "fisher_storage", "seed": "label_seed", "target_modules": "fisher_modules"}
SUBSPACE_CONFIG_RENAMES = {"method": "eigen_solver", "seed": "solver_seed"}


class NonFiniteLossError(RuntimeError):
    """The task loss or an AlignGuard term became NaN/inf: training stops instead of writing NaN adapters."""


def config_from_metadata(cls, saved: dict, renames: dict[str, str], source: str):
    """Rebuild a config dataclass from its saved dict (`metadata["config"]`), mapping renamed fields.

    Raises:
        ValueError: a field this version does not know, or an old and a new name with different values.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    for key, value in saved.items():
        new = renames.get(key, key)
        if new in values and values[new] != value:
            raise ValueError(f"{source}: both {key!r} and {new!r} are set, to different values; keep {new!r} only")
        values[new] = value
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"{source}: unknown {cls.__name__} fields {unknown} (known: {sorted(known)}); the file was written by "
            f"another version: re-run `alignguard fisher`, or pass {cls.__name__.replace('Config', '').lower()}"
            f"_config={cls.__name__}(...) to the trainer explicitly"
        )
    return cls(**values)


class _AlignGuardCallback(TrainerCallback):
    """Re-projects lora_B after each optimizer step (mode="project") and refreshes U on schedule."""

    def __init__(self, trainer: AlignGuardMixin):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        cfg = t.alignguard_config
        if cfg.refresh_every and state.global_step % cfg.refresh_every == 0:
            t.refresh_subspaces()
        if t._projector is not None:
            t._projector.project_()
        return control


class AlignGuardMixin:
    """Adds the AlignGuard loss, logging, projection, refresh and state saving to a HF Trainer subclass.

    Args (keyword-only, besides the base trainer's own):
        subspaces: `AlignmentSubspaces` (from `build_subspaces`).
        alignguard_config: `AlignGuardConfig`.
        fisher_state: the `FisherState` the subspaces came from (saved beside the adapter when given). With
            `refresh_every`, the refresh re-estimates with its config (`fisher_state.metadata["config"]`).
        alignment_data: batches of alignment data (e.g. `alignguard.data.make_batches`, this rank's share
            `shard_batches(...)` under several processes); required when `refresh_every` is set.
        fisher_config / subspace_config: settings for the refresh, overriding the ones the Fisher state and the
            subspaces were built with (`subspaces.metadata["config"]`).

    Upon completion of `__init__`, `self.regularizer` holds the grouped regulariser of `self.model`; its
    `unprotected` lists the LoRA layers without a subspace (allowed only with `allow_unprotected=True`).

    Raises:
        ValueError: `refresh_every` without `alignment_data` or without `fisher_state` (or `fisher_config`), or
            saved configs this version cannot read; see also `AlignGuardRegularizer`.
        NonFiniteLossError: (during training) the task loss or an AlignGuard term is NaN/inf.
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
        self.subspaces = subspaces
        self.fisher_state = fisher_state
        self.alignment_data = alignment_data
        self.fisher_config = fisher_config
        self.subspace_config = subspace_config
        if self.alignguard_config.refresh_every:
            self._resolve_refresh_configs()  # fail now, not after refresh_every steps
        self.regularizer = self._make_regularizer(subspaces)
        self._ag_metrics: dict[str, list] = defaultdict(list)
        self._ag_step_task: torch.Tensor | None = None  # task loss of the optimizer step so far
        self._ag_hooks: list = []
        self._projector: SubspaceProjector | None = None
        self.add_callback(_AlignGuardCallback(self))
        if self.alignguard_config.mode == "project":
            self._set_projector(subspaces)
            self._projector.project_()

    def _make_regularizer(self, subspaces: AlignmentSubspaces) -> AlignGuardRegularizer:
        return AlignGuardRegularizer(self.model, subspaces, self.alignguard_config, seed=self.args.seed)

    def _set_projector(self, subspaces: AlignmentSubspaces) -> None:
        detach_projection_hooks(self._ag_hooks)
        self._projector = SubspaceProjector(self.model, subspaces)
        self._ag_hooks = self._projector.attach_hooks()

    def _resolve_refresh_configs(self) -> tuple[FisherConfig, SubspaceConfig]:
        """The configs a refresh uses: the explicit ones, else those the Fisher state / subspaces were built with."""
        missing = []
        if self.alignment_data is None:
            missing.append("alignment_data= (batches of alignment data for the Fisher pass)")
        if self.fisher_state is None and self.fisher_config is None:
            missing.append("fisher_state= (the FisherState the subspaces were built from; or fisher_config=)")
        if missing:
            raise ValueError(
                f"AlignGuardConfig.refresh_every={self.alignguard_config.refresh_every} re-estimates the Fisher "
                f"state during training, so AlignGuardTrainer needs {' and '.join(missing)}"
            )
        if self.fisher_config is None:
            saved = self.fisher_state.metadata.get("config")
            if saved is None:
                raise ValueError(
                    "refresh_every: fisher_state.metadata has no 'config' (not made by estimate_fisher), so the "
                    "refresh would not know how it was estimated; pass fisher_config=FisherConfig(...)"
                )
            cfg = config_from_metadata(FisherConfig, saved, FISHER_CONFIG_RENAMES, 'fisher_state.metadata["config"]')
            self.fisher_config = dataclasses.replace(cfg, show_progress=False)
        if self.subspace_config is None:
            saved = self.subspaces.metadata.get("config")
            if saved is None:
                raise ValueError(
                    "refresh_every: subspaces.metadata has no 'config' (not made by build_subspaces), so the "
                    "refresh would not know how to rebuild U; pass subspace_config=SubspaceConfig(...)"
                )
            self.subspace_config = config_from_metadata(
                SubspaceConfig, saved, SUBSPACE_CONFIG_RENAMES, 'subspaces.metadata["config"]'
            )
        return self.fisher_config, self.subspace_config

    def refresh_subspaces(self) -> None:
        """Recompute the Fisher factor at the current weights and rebuild U (the refresh schedule).

        Uses the Fisher state's and subspaces' own configs (or the explicit ones), so at unchanged weights it
        reproduces them exactly; task factors are kept, the running tau and the random generator carry over.
        """
        fisher_config, subspace_config = self._resolve_refresh_configs()
        if self.alignguard_config.alignment_input == "kfac" and not fisher_config.input_factor:
            # R_A needs A_in at the new weights too
            fisher_config = dataclasses.replace(fisher_config, input_factor=True)
        model_id = self.fisher_state.metadata.get("model_id") if self.fisher_state is not None else None
        task_factors = self.subspaces.task_factors
        self.fisher_state = estimate_fisher(self.model, self.alignment_data, fisher_config, model_id=model_id)
        self.subspaces = build_subspaces(self.fisher_state, subspace_config)
        self.subspaces.task_factors = task_factors
        regularizer = self._make_regularizer(self.subspaces)
        regularizer.carry_state_from(self.regularizer)
        self.regularizer = regularizer
        if self._projector is not None:
            self._set_projector(self.subspaces)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether the Trainer leaves the loss undivided by the accumulation steps (mirrors Trainer.training_step)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
                getattr(self, "compute_loss_func", None) is not None
            )
        return bool(scaled)

    def _ga_divisor(self, num_items_in_batch) -> float:
        """What the Trainer divides this micro-batch's loss by before backward (transformers 5.23 training_step).

        It divides by the accumulation steps unless the loss is already normalised by `num_items_in_batch`, and
        it does so under DeepSpeed too (passing `scale_wrt_gas=False`, so the engine does not divide again).
        """
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            return 1.0
        return float(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps))

    def _ga_weight(self, num_items_in_batch) -> float:
        """Weight that makes reg contribute once, unscaled, per optimizer step: it undoes the Trainer's divisor."""
        return self._ga_divisor(num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result
        loss = result[0] if return_outputs else result
        if loss.dim() > 0:  # DataParallel: one loss per GPU; the Trainer takes their mean right after, so do we
            loss = loss.mean()
        divisor = self._ga_divisor(num_items_in_batch)
        # The step's task loss as the Trainer's `loss` log counts it: each micro-batch's share after its divisor.
        share = loss.detach() / divisor
        self._ag_step_task = share if self._ag_step_task is None else self._ag_step_task + share
        if self.accelerator.sync_gradients:
            loss = loss + self._step_regularizer() * divisor
        return (loss, *result[1:]) if return_outputs else loss

    def _step_regularizer(self) -> torch.Tensor:
        """The AlignGuard total, once per optimizer step (on the micro-batch that syncs gradients)."""
        # Looked up per call: engines that wrap the model after __init__ (FSDP2) replace the parameter objects.
        with full_parameters(regularizer_parameters(self.regularizer)):  # gathers ZeRO-3-partitioned weights
            terms = self.regularizer()
        task, self._ag_step_task = self._ag_step_task, None
        # One device synchronisation per step (the Trainer's own NaN filter already makes one): stop before a
        # NaN reaches the optimizer instead of training to NaN adapters.
        if not bool(torch.isfinite(task + terms["total"].detach().to(task.device))):
            self._raise_nonfinite(task, terms)
        # Detached tensors, turned into floats only when logging: a .item() per term would add more syncs.
        self._ag_metrics["task_loss"].append(task)
        for key in (*TERM_NAMES, "total"):
            self._ag_metrics[f"reg_{key}"].append(terms[key].detach())
        return terms["total"].to(task.dtype)

    def _raise_nonfinite(self, task: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        step = self.state.global_step + 1
        if not bool(torch.isfinite(task)):
            raise NonFiniteLossError(
                f"AlignGuard: the task loss is {float(task)} at optimizer step {step} (the model's own loss, before "
                "any AlignGuard term): the LoRA weights or the inputs hold NaN/inf. Lower the learning rate, train "
                "in bf16/fp32 instead of fp16, or check the data"
            )
        bad_terms = [k for k in TERM_NAMES if not bool(torch.isfinite(terms[k]))]
        with full_parameters(regularizer_parameters(self.regularizer)):
            where = self.regularizer.nonfinite_modules()
        shown = ", ".join(f"{term} in {name}" for name, term in where[:5]) + (", ..." if len(where) > 5 else "")
        raise NonFiniteLossError(
            f"AlignGuard: the regulariser is not finite at optimizer step {step}: term(s) {bad_terms}"
            f"{f' ({shown})' if shown else ''}. The subspaces' factors (eigenvalues, bases) or the LoRA weights "
            "hold NaN/inf: re-estimate the Fisher state (`alignguard fisher`) or lower the learning rate"
        )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Means over the optimizer steps since the last log, like the Trainer's `loss`; the task loss differs per
        # rank, so it is also averaged over ranks as the Trainer does (every rank logs, so the gather matches).
        if self._ag_metrics and "loss" in logs:
            for key, values in self._ag_metrics.items():
                if not values:
                    continue
                mean = torch.stack([v.float() for v in values]).mean()
                if key == "task_loss" and self.accelerator.num_processes > 1:
                    mean = self.accelerator.gather(mean[None]).mean()
                logs[key] = float(mean)
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
            if self._projector is not None:
                self._projector.project_()


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
