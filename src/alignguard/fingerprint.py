"""Two fingerprints of a model, for two questions.

- `architecture_fingerprint`: which parameter names and shapes (not values) the base model has. Two checkpoints
  of one architecture share it.
- `base_weights_fingerprint`: which base-model weights (values) the model has, ignoring LoRA parameters and PEFT's
  renaming, so it is the same before and after `get_peft_model` and while only LoRA weights train (a Fisher
  state keys on it: factors of other weights are not this model's).
- `weights_fingerprint`: what the model computes. It changes whenever a weight or the active adapters change
  (the generation cache and DriftCheck results key on it).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .targets import canonical_name


def base_parameters(model: nn.Module):
    """(canonical base-model name, parameter) of every non-LoRA parameter: PEFT's `base_model.model.` prefix and
    `.base_layer` infix removed, so the names are those of the model before `get_peft_model`."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        yield canonical_name(name.replace(".base_layer.", ".")).replace(".base_layer", ""), p


def architecture_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Canonical base parameter name -> shape (what `architecture_fingerprint` hashes)."""
    return {name: list(p.shape) for name, p in base_parameters(model)}


def architecture_fingerprint(model: nn.Module) -> str:
    """Hash of the base model's canonical parameter names and shapes (not values): identifies the architecture."""
    h = hashlib.sha256()
    for cname, p in base_parameters(model):
        h.update(f"{cname}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def base_weights_fingerprint(model: nn.Module) -> str:
    """Hash of the base model's weights (canonical names, shapes, float64 sum and L2 norm of each, LoRA skipped).

    Identical before and after `get_peft_model` and while only LoRA weights change; different for a same-shape
    model with other weights. The reductions are written with 9 significant digits, so the summation order of
    another device does not change it; the dtype is not hashed, so a bf16 checkpoint loaded in float32 keeps its
    fingerprint (a model rounded to another dtype does not: its weights are different numbers).
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for cname, p in base_parameters(model):
            t = p.detach()
            if hasattr(t, "full_tensor"):  # an FSDP2 DTensor: every rank gathers the same whole weight
                t = t.full_tensor()
            s = t.sum(dtype=torch.float64).item() if t.numel() else 0.0
            n = torch.linalg.vector_norm(t, dtype=torch.float64).item() if t.numel() else 0.0
            h.update(f"{cname}|{tuple(t.shape)}|{s:.8e}|{n:.8e}\n".encode())
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
