"""What the peers' Trainer mixins (AsFT, Lisa, gradient surgery) share: a loss term added once per optimizer step,
and per-step values logged as their mean since the last log, beside the Trainer's `loss`.

AlignGuard's own mixin (`alignguard.trainer`) keeps its version: it also splits the logged task loss by rank.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..trainer import AlignGuardMixin


class StepTermsMixin:
    """Mixed in before `transformers.Trainer`: `_log_step` records a value for this optimizer step; `log` adds each
    key's mean over the steps since the last log; `_add_step_term` adds `weight * term` to a `compute_loss` result
    on the micro-batch that syncs gradients, weighted like AlignGuard's terms under gradient accumulation."""

    # The Trainer's loss divisor under gradient accumulation (DeepSpeed and num_items_in_batch included): the same
    # bookkeeping as AlignGuard's, so every term is weighted alike.
    _loss_is_scaled_for_ga = AlignGuardMixin._loss_is_scaled_for_ga
    _ga_divisor = AlignGuardMixin._ga_divisor

    def _log_step(self, key: str, value) -> None:
        if not hasattr(self, "_step_logged"):
            self._step_logged: dict[str, list] = defaultdict(list)
        self._step_logged[key].append(value)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        logged = getattr(self, "_step_logged", None)
        if logged and "loss" in logs:  # the mean over the optimizer steps since the last log
            for key, values in logged.items():
                logs[key] = float(torch.stack([torch.as_tensor(v).float().cpu() for v in values]).mean())
            logged.clear()
        super().log(logs, *args, **kwargs)

    def _add_step_term(self, result, return_outputs: bool, num_items_in_batch, weight: float, term: torch.Tensor):
        """`result` (a `compute_loss` return value) with `weight * term` added to its loss, undoing the Trainer's
        accumulation divisor so the term counts once, unscaled, per optimizer step."""
        loss = result[0] if return_outputs else result
        if loss.dim() > 0:  # DataParallel: one loss per GPU, averaged by the Trainer right after
            loss = loss.mean()
        weight = weight * self._ga_divisor(num_items_in_batch)
        loss = loss + (weight * term).to(device=loss.device, dtype=loss.dtype)
        return (loss, *result[1:]) if return_outputs else loss
