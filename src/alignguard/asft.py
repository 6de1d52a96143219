"""AsFT: a fine-tune-time penalty on the part of the LoRA update that leaves the alignment direction.

"AsFT: Anchoring Safety During LLM Fine-Tuning Within Narrow Safety Basin" (AAAI 2026, arXiv 2506.08473). Per
adapted layer, with V = W_aligned - W_base and the Safe LoRA matrix C = V Vᵀ / ‖V‖_F (Hsu et al. 2024):

    penalty = asft_lambda * Σ_layers ‖(I - C) ΔW‖_F²,   ΔW = s B A   (s = the LoRA scaling)

Followed: PKU-YuanGroup/AsFT, `AsFT_finetuning.py` (`SafeLoRA.get_aligned_matrix`: C per target weight, built once
before training) and `utils/AsFT_train_utils.py` (the term added to the loss inside the training loop). Our own
code, and it computes the same value without any d_out x d_in product per step: C is factored once as C = F Fᵀ
(F: d_out x rank(V), from the smaller Gram matrix of V), and

    ‖(I - C) s B A‖_F² = s² Σ (Xᵀ X) ⊙ (A Aᵀ),   X = B - F (Fᵀ B)   (d_out x r; Xᵀ X and A Aᵀ are r x r),

so a step costs O((d_out rank(V) + (d_out + d_in) r) r) per layer. X is formed before the square, so nothing is
lost to cancellation when the penalty is small against ‖s B A‖². Differences from the paper's code: it penalises
B A without the LoRA scaling s (this one penalises the update the model applies, s B A) and adds the term to every
micro-batch (this one adds it once per optimizer step; see `recipes/asft.py`).

Components only: the trainer that adds the term is `alignguard.recipes.asft.AsftTrainer`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .lox import oriented_weight, paired_target_modules


@dataclass
class AsftConfig:
    """Options of the AsFT penalty (`asft` compare rows; per row: `asft@asft_lambda=10`).

    Args:
        asft_lambda: weight of Σ_layers ‖(I - C) s B A‖_F² in the loss (0: plain LoRA). Default 1.0: the value of
            every training script of the paper's code (`--lambda_reg 1`, Llama-2-7B-Chat, r=8, alpha=32). There it
            multiplies ‖(I - C) B A‖² without the scaling s = alpha / r = 4, so the paper's effective weight on the
            update s B A is 1/16; the scale of the term also depends on ‖V‖_F (C is not a projector), so lambda
            is a per-model setting to sweep (`asft@asft_lambda=...`), not a constant that transfers.
    """

    asft_lambda: float = field(default=1.0, metadata={"help": "Weight of the AsFT penalty sum ||(I - C) s B A||^2."})

    def __post_init__(self):
        if not self.asft_lambda >= 0:  # also refuses NaN
            raise ValueError(f"asft_lambda: must be >= 0, got {self.asft_lambda}")

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def build_asft_factors(
    aligned_model: nn.Module, base_model: nn.Module, target_modules=None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Per target layer the factor F (d_out x rank(V), in `dtype`, on the CPU) with F Fᵀ = C = V Vᵀ / ‖V‖_F.

    Computed in float64 from the smaller Gram matrix of V: for d_out <= d_in, V Vᵀ = Q Λ Qᵀ and F = Q √(Λ/‖V‖_F);
    otherwise Vᵀ V = W Λ Wᵀ and F = V W / √‖V‖_F (no division by small singular values). Directions with
    eigenvalues below 1e-12 of the largest are dropped: V is often low-rank (an aligned model made by merging a
    LoRA adapter), which keeps F, and the step cost, small. A layer whose V is exactly zero gets an empty F
    (C = 0, the limit of C as V -> 0: its whole update counts as leaving the alignment direction).

    Args:
        aligned_model / base_model: the aligned model and its unaligned base (plain or PEFT models; same
            architecture). Keyed by canonical name, so factors built before `get_peft_model` apply after it.
        target_modules: module-name suffixes (default: the usual projections, or a PEFT model's LoRA layers).
    """
    factors = {}
    for name, (module, base) in paired_target_modules(aligned_model, base_model, target_modules).items():
        v = (oriented_weight(module) - oriented_weight(base).to(module.weight.device)).cpu()
        norm = float(torch.linalg.matrix_norm(v))
        if norm == 0.0:
            factors[name] = torch.zeros(v.shape[0], 0, dtype=dtype)
            continue
        wide = v.shape[0] <= v.shape[1]
        eigvals, eigvecs = torch.linalg.eigh(v @ v.T if wide else v.T @ v)
        keep = eigvals > eigvals[-1] * 1e-12
        eigvals, eigvecs = eigvals[keep], eigvecs[:, keep]
        f = eigvecs * (eigvals / norm).sqrt() if wide else (v @ eigvecs) / norm**0.5
        factors[name] = f.to(dtype).contiguous()
    return factors


class AsftPenalty:
    """Σ over the LoRA layers of `peft_model` of ‖(I - C) s B A‖_F², with the factors of `build_asft_factors`.

    Computed in float32 (or the factors' dtype if wider) whatever the LoRA weights' dtype, differentiable in
    lora_A and lora_B. The factors move to a layer's device on first use.

    Raises:
        ValueError: a LoRA layer without a factor (the factors were built for other target modules), or DoRA.
    """

    def __init__(self, peft_model: nn.Module, factors: dict[str, torch.Tensor]):
        from .targets import lora_modules

        self.layers = []
        for name, (layer, adapter) in sorted(lora_modules(peft_model).items()):
            if name not in factors:
                raise ValueError(
                    f"AsFT: LoRA layer {name!r} has no factor C (built for {len(factors)} other layers); build the "
                    "factors with the same target modules as the adapter"
                )
            self.layers.append((name, layer, adapter))
        self.factors = dict(factors)

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _, _ in self.layers]

    def per_layer(self) -> dict[str, torch.Tensor]:
        """‖(I - C) s B A‖_F² of every layer (0-d tensors)."""
        out = {}
        for name, layer, adapter in self.layers:
            b, a = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
            f = self.factors[name]
            dtype = torch.promote_types(f.dtype, torch.float32)
            if f.device != b.device or f.dtype != dtype:
                f = self.factors[name] = f.to(b.device, dtype)
            b, a = b.to(dtype), a.to(dtype)
            x = b - f @ (f.T @ b)
            out[name] = layer.scaling[adapter] ** 2 * ((x.T @ x) * (a @ a.T)).sum()
        return out

    def __call__(self) -> torch.Tensor:
        """The unweighted sum over layers (multiply by `asft_lambda` for the loss term)."""
        terms = list(self.per_layer().values())
        return torch.stack(terms).sum() if terms else torch.zeros(())
