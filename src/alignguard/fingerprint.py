"""Two fingerprints of a model, for two questions.

- `architecture_fingerprint`: which parameter names and shapes (not values) the base model has. Two checkpoints
  of one architecture share it.
- `weights_fingerprint`: what the model computes. It changes whenever a weight or the active adapters change
  (the generation cache and DriftCheck results key on it).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .targets import canonical_name


def architecture_fingerprint(model: nn.Module) -> str:
    """Hash of the base model's canonical parameter names and shapes (not values): identifies the architecture."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        cname = canonical_name(name.replace(".base_layer.", ".")).replace(".base_layer", "")
        h.update(f"{cname}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A content fingerprint of `model`: changes whenever its weights or active adapters change.

    Hashes every parameter's name, shape and dtype plus two cheap float64 reductions of its values
    (sum and L2 norm), so a fine-tuned or merged model differs from its base. PEFT tuner layers add
    their active adapter names and whether adapters are disabled, because
    `with peft_model.disable_adapter():` changes the outputs without changing any weight.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach()
            # Two reductions: a sum alone can miss updates that cancel out, a norm alone misses sign flips.
            s = t.sum(dtype=torch.float64).item() if t.numel() else 0.0
            n = torch.linalg.vector_norm(t, dtype=torch.float64).item() if t.numel() else 0.0
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{s:.10e}|{n:.10e}\n".encode())
    for name, module in model.named_modules():
        if hasattr(module, "disable_adapters") and hasattr(module, "active_adapters"):
            try:
                state = f"{name}|{bool(module.disable_adapters)}|{list(module.active_adapters)}"
            except (AttributeError, TypeError):
                continue
            h.update(state.encode())
    return h.hexdigest()
