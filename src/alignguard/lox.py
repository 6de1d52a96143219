"""LoX: low-rank extrapolation of the alignment delta, training-free, before fine-tuning.

Perin et al., "LoX: Low-Rank Extrapolation Robustifies LLM Safety Against Fine-tuning", COLM 2025
(arXiv 2506.15606). Per weight matrix, with ΔW = W_aligned - W_base and its rank-k SVD truncation Proj_k(ΔW):

    W <- W_aligned + alpha * Proj_k(ΔW)

Followed: VITA-Group/LoX, `safety/LoX.py` (the per-matrix SVD, `S[k:] = 0`, `k=0` meaning the full delta). Our
own code; it differs in what it touches: the paper's script extrapolates every 2-D parameter (embeddings and
lm_head included), this one only the given target projections (those LoRA will adapt, by default), and it
computes the SVD in `dtype` (float32 by default, as the script does) on the weights' own device.

`oriented_weight` (d_out x d_in, GPT-2 Conv1D transposed) is shared with the AsFT penalty (`alignguard.asft`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class LoxConfig:
    """Options of the LoX extrapolation (`lox` compare rows; per row: `lox@lox_rank=4,lox_alpha=1.0`).

    Args:
        lox_rank: k, the number of top singular directions of ΔW = W_aligned - W_base extrapolated per layer;
            0 extrapolates the full delta (as `--k 0` in the paper's script). Default 6: the paper's choice for
            Llama-2-7B-Chat.
        lox_alpha: the extrapolation coefficient alpha (0 leaves the model as it is). Default 1.25: the paper's
            choice for Llama-2-7B-Chat.
    """

    lox_rank: int = field(default=6, metadata={"help": "Top-k singular directions of W_aligned - W_base (0: all)."})
    lox_alpha: float = field(default=1.25, metadata={"help": "Extrapolation coefficient alpha."})

    def __post_init__(self):
        if self.lox_rank < 0:
            raise ValueError(f"lox_rank: must be >= 0 (0 = the full delta), got {self.lox_rank}")
        if not self.lox_alpha >= 0:  # also refuses NaN
            raise ValueError(f"lox_alpha: must be >= 0, got {self.lox_alpha}")

    def to_dict(self) -> dict:
        return asdict(self)


def oriented_weight(module: nn.Module, dtype=torch.float64) -> torch.Tensor:
    """The weight as d_out x d_in in `dtype` (a GPT-2 Conv1D stores it transposed), detached."""
    from transformers.pytorch_utils import Conv1D

    w = module.weight.detach().to(dtype)
    return w.T if isinstance(module, Conv1D) else w


def paired_target_modules(aligned_model: nn.Module, base_model: nn.Module, target_modules=None) -> dict:
    """{canonical name: (aligned weight module, base weight module)} for the target projections of two models of
    one architecture (a LoRA layer stands for its base layer).

    Raises:
        ValueError: a target of the aligned model that the base model lacks, or with another weight shape (the
            two are not the same architecture).
    """
    from .targets import find_target_modules, is_lora_layer

    def weight_module(m):
        return m.get_base_layer() if is_lora_layer(m) else m

    aligned = find_target_modules(aligned_model, target_modules)
    base = find_target_modules(base_model, target_modules)
    pairs = {}
    for name, module in aligned.items():
        module, other = weight_module(module), base.get(name)
        if other is None or weight_module(other).weight.shape != module.weight.shape:
            raise ValueError(
                f"base model: no layer {name!r} with the aligned model's weight shape; the base model must be the "
                "same architecture as the aligned one (pass the right --base_model)"
            )
        other = weight_module(other)
        pairs[name] = (module, other)
    return pairs


@torch.no_grad()
def apply_lox_(
    aligned_model: nn.Module,
    base_model: nn.Module,
    config: LoxConfig | None = None,
    target_modules=None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Extrapolate the aligned model in place: per target layer W <- W_aligned + alpha * Proj_k(W_aligned - W_base).

    Args:
        aligned_model: the aligned model (a plain model, before `get_peft_model`); modified in place.
        base_model: its unaligned base (same architecture); only read.
        config: `LoxConfig` (k and alpha).
        target_modules: module-name suffixes to extrapolate (default: the usual projections,
            `targets.DEFAULT_TARGET_MODULES`); compare passes the row's LoRA targets.
        dtype: precision of the delta and its SVD (float32 like the paper's script; float64 for references).

    Returns:
        `{"lox_rank", "lox_alpha", "layers", "zero_delta_layers", "energy_kept", "delta_norm", "added_norm"}`:
        the extrapolated layers (canonical names), those whose delta is exactly zero (left as they are), per
        layer the share of ||ΔW||_F^2 the top k directions hold, and the Frobenius norms over all layers.

    Upon completion every target weight of `aligned_model` holds the extrapolated value in its own dtype.
    """
    from transformers.pytorch_utils import Conv1D

    config = config or LoxConfig()
    layers, zero, energy = [], [], {}
    delta_sq = added_sq = 0.0
    for name, (module, base) in sorted(paired_target_modules(aligned_model, base_model, target_modules).items()):
        delta = oriented_weight(module, dtype) - oriented_weight(base, dtype).to(module.weight.device)
        total = float(delta.square().sum())
        if total == 0.0:
            zero.append(name)  # nothing to extrapolate (a layer alignment did not change)
            continue
        k = config.lox_rank
        if k == 0 or k >= min(delta.shape):
            added, kept = delta, total
        else:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            added = (u[:, :k] * s[:k]) @ vh[:k]
            kept = float(s[:k].square().sum())
        new = oriented_weight(module, dtype) + config.lox_alpha * added
        module.weight.copy_((new.T if isinstance(module, Conv1D) else new).to(module.weight.dtype))
        layers.append(name)
        energy[name] = kept / total
        delta_sq += total
        added_sq += kept * config.lox_alpha**2
    return {
        **config.to_dict(),
        "layers": layers,
        "zero_delta_layers": zero,
        "energy_kept": energy,
        "delta_norm": delta_sq**0.5,
        "added_norm": added_sq**0.5,
    }
