"""Safe LoRA (Hsu et al. 2024), the post-hoc projection baseline of `alignguard compare` (method `safe_lora`)."""

from __future__ import annotations

import torch


@torch.no_grad()
def apply_safe_lora_(peft_model, base_model, threshold: float) -> dict:
    """Safe LoRA (Hsu et al. 2024), post hoc: per layer, C = V V^T / ||V||_F with V = W_aligned - W_base; where
    cos(dW, C dW) < threshold replace dW by C dW. Done on lora_B (C dW = s (C B) A), so the adapter stays LoRA.
    The aligned weights are the PEFT model's own base layers; `base_model` is the unaligned model.

    Returns {"projected": [...], "cosines": {...}}.
    """
    from ..targets import find_target_modules, lora_modules

    base_mods = find_target_modules(base_model)
    projected, cosines = [], {}
    for name, (layer, ad) in lora_modules(peft_model).items():
        if name not in base_mods:
            continue
        v = _oriented_weight(layer.get_base_layer()) - _oriented_weight(base_mods[name])
        norm = torch.linalg.matrix_norm(v)
        if norm == 0:
            continue
        b = layer.lora_B[ad].weight
        a = layer.lora_A[ad].weight.double()
        cb = (v @ (v.T @ b.double())) / norm
        dw, cdw = b.double() @ a, cb @ a
        cos = float((dw * cdw).sum() / (torch.linalg.matrix_norm(dw) * torch.linalg.matrix_norm(cdw) + 1e-30))
        cosines[name] = cos
        if cos < threshold:
            b.copy_(cb.to(b.dtype))
            projected.append(name)
    return {"projected": projected, "cosines": cosines}


def _oriented_weight(module) -> torch.Tensor:
    from transformers.pytorch_utils import Conv1D

    w = module.weight.detach().double()
    return w.T if isinstance(module, Conv1D) else w
