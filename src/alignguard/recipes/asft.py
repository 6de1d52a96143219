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

from collections import defaultdict
from collections.abc import Callable

import torch
from transformers import Trainer

from ..asft import AsftConfig, AsftPenalty, build_asft_factors
from ..trainer import AlignGuardMixin


class AsftMixin:
    """Adds the AsFT penalty to a HF Trainer subclass's loss (keyword-only `asft_factors`, `asft_config`).

    Upon completion of `__init__`, `self.asft_penalty` holds the penalty over the LoRA layers of `self.model`.
    """

    def __init__(self, *args, asft_factors: dict[str, torch.Tensor], asft_config: AsftConfig | None = None, **kw):
        super().__init__(*args, **kw)
        self.asft_config = asft_config or AsftConfig()
        self.asft_penalty = AsftPenalty(self.model, asft_factors)
        self._asft_logged: dict[str, list] = defaultdict(list)

    # The Trainer's loss divisor under gradient accumulation (DeepSpeed and num_items_in_batch included): the same
    # bookkeeping as AlignGuard's, so the two terms are weighted alike.
    _loss_is_scaled_for_ga = AlignGuardMixin._loss_is_scaled_for_ga
    _ga_divisor = AlignGuardMixin._ga_divisor

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training or not self.accelerator.sync_gradients:
            return result
        loss = result[0] if return_outputs else result
        if loss.dim() > 0:  # DataParallel: one loss per GPU, averaged by the Trainer right after
            loss = loss.mean()
        penalty = self.asft_penalty()
        self._asft_logged["asft_penalty"].append(penalty.detach())
        if self.asft_config.asft_lambda > 0:
            weight = self.asft_config.asft_lambda * self._ga_divisor(num_items_in_batch)
            loss = loss + (weight * penalty).to(device=loss.device, dtype=loss.dtype)
        return (loss, *result[1:]) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._asft_logged and "loss" in logs:  # the mean over the optimizer steps since the last log
            for key, values in self._asft_logged.items():
                logs[key] = float(torch.stack([v.float().cpu() for v in values]).mean())
            self._asft_logged.clear()
        super().log(logs, *args, **kwargs)


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
