"""AsFT as a training recipe: a HF Trainer whose loss adds asft_lambda * Σ ‖(I - C) s B A‖_F² (`alignguard.asft`).

Used by the `asft` rows of `alignguard compare` through `run_train(trainer_factory=...)`:

    factors = build_asft_factors(aligned_model, base_model, target_modules)   # before get_peft_model
    trainer = AsftTrainer(model=peft_model, args=..., train_dataset=..., asft_factors=factors,
                          asft_config=AsftConfig(asft_lambda=1.0))

The term does not depend on the batch and the LoRA weights do not change within an accumulation cycle, so, as in
`alignguard.trainer.AlignGuardMixin` (whose gradient-accumulation bookkeeping this reuses), it is added once per
optimizer step, on the micro-batch that syncs gradients, weighted to undo the Trainer's 1/GA loss scaling. The
paper's loop (PKU-YuanGroup/AsFT, `utils/AsFT_train_utils.py`) adds it to every micro-batch instead, which is
GA times the weight; the two agree at GA = 1, the setting of all its scripts. `asft_penalty` (the unweighted
sum) is logged beside `loss`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Trainer

from ..asft import AsftConfig, AsftPenalty, build_asft_factors
from .step_terms import StepTermsMixin


class AsftMixin(StepTermsMixin):
    """Adds the AsFT penalty to a HF Trainer subclass's loss (keyword-only `asft_factors`, `asft_config`).

    Upon completion of `__init__`, `self.asft_penalty` holds the penalty over the LoRA layers of `self.model`.
    """

    def __init__(self, *args, asft_factors: dict[str, torch.Tensor], asft_config: AsftConfig | None = None, **kw):
        super().__init__(*args, **kw)
        self.asft_config = asft_config or AsftConfig()
        self.asft_penalty = AsftPenalty(self.model, asft_factors)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training or not self.accelerator.sync_gradients:
            return result
        penalty = self.asft_penalty()
        self._log_step("asft_penalty", penalty.detach())
        if self.asft_config.asft_lambda > 0:
            return self._add_step_term(
                result, return_outputs, num_items_in_batch, self.asft_config.asft_lambda, penalty
            )
        return result


class AsftTrainer(AsftMixin, Trainer):
    """`transformers.Trainer` with the AsFT penalty."""


def prepare_asft(aligned_model, base_model, config: AsftConfig, target_modules) -> tuple[dict, Callable]:
    """The factors of C for the row's target modules (built now, before LoRA is added) and a `trainer_factory`
    for `run_train`. Returns `(info, trainer_factory)`; `info` records what is applied (lambda, layers, the
    layers whose V is zero, the rank of each C) for the row's result."""
    factors = build_asft_factors(aligned_model, base_model, target_modules)
    info = {
        **config.to_dict(),
        "layers": sorted(factors),
        "zero_delta_layers": sorted(n for n, f in factors.items() if f.shape[1] == 0),
        "c_rank": {n: int(f.shape[1]) for n, f in sorted(factors.items())},
    }

    def trainer_factory(**kwargs):
        return AsftTrainer(**kwargs, asft_factors=factors, asft_config=config)

    return info, trainer_factory
