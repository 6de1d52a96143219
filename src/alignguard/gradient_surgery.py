"""Gradient surgery against the alignment loss: remove the part of the task gradient that would raise it.

PCGrad (Yu et al., NeurIPS 2020) applied to one protected objective, as SPF (arXiv 2601.10141) does for safety:
with g the task gradient of the trainable (LoRA) parameters and r the gradient of the alignment loss (the NLL of
refusals to unsafe prompts under the model being trained), a step along -g changes the alignment loss by about
-lr * <g, r>. When <g, r> < 0 the task step would raise it, so the component of g along r is removed:

    g <- g - (<g, r> / ||r||^2) r          (only when <g, r> < 0; otherwise g is left as it is)

after which <g, r> = 0: to first order the step leaves the alignment loss unchanged. The inner product is over
all trainable parameters at once (one flattened vector), not per layer: the alignment loss is one scalar, and a
per-layer rule would let layers trade against each other. r is recomputed every `surgery_every` optimizer steps
and reused in between (the cost is one extra forward and backward on an alignment batch per recomputation).

Unlike the weight-space penalties (AlignGuard's R_A, EWC, AsFT) this constrains only the direction of each step
against the current alignment gradient, so it costs task progress only where the two objectives conflict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .config_values import require_whole_number


@dataclass
class SurgeryConfig:
    """Options of the gradient-surgery rows (`surgery`; per row: `surgery@surgery_every=4`).

    Args:
        surgery_every: recompute the alignment gradient every k optimizer steps (1 = every step); in between the
            last one is reused.
        surgery_batches: alignment batches (of the Fisher pass's alignment data) averaged per recomputation.
    """

    surgery_every: int = field(
        default=1, metadata={"help": "Recompute the alignment gradient every k optimizer steps (1: every step)."}
    )
    surgery_batches: int = field(
        default=1, metadata={"help": "Alignment batches averaged per alignment-gradient recomputation."}
    )

    def __post_init__(self):
        require_whole_number(self, ("surgery_every", "surgery_batches"))

    def to_dict(self) -> dict:
        return asdict(self)


def flat_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """<a, b> over lists of same-shaped tensors, accumulated in float64 (a float64 scalar on a's first device)."""
    device = a[0].device
    return sum((x.double() * y.double()).sum().to(device) for x, y in zip(a, b, strict=True))


@torch.no_grad()
def project_out_conflict_(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> dict:
    """Remove from `grads` (in place) its component along `ref` when the two conflict (<grads, ref> < 0).

    Args:
        grads: the task gradient, one tensor per trainable parameter.
        ref: the alignment-loss gradient, same shapes.

    Returns:
        {"conflict": bool, "cosine": cos(grads, ref) before the surgery}. A zero `ref` or `grads` is no conflict.
    """
    dot = flat_dot(grads, ref)
    ref_sq = flat_dot(ref, ref)
    g_sq = flat_dot(grads, grads)
    denom = torch.sqrt(ref_sq * g_sq)
    cosine = float(dot / denom) if float(denom) > 0 else 0.0
    conflict = bool(dot < 0) and float(ref_sq) > 0
    if conflict:
        coef = dot / ref_sq
        for g, r in zip(grads, ref, strict=True):
            g.sub_((coef * r.double()).to(g.dtype))
    return {"conflict": conflict, "cosine": cosine}
