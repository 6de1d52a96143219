"""Finding the modules AlignGuard works on, with names that are the same before and after `get_peft_model`.

A Fisher factor estimated on the base model must apply to the LoRA layers created later (and the other way
round), so every module is keyed by its *canonical* name: the module path in the base model, without PEFT's
`base_model.model.` prefix or `.base_layer` suffix.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# The usual attention and MLP projections of decoder-only models (Llama/Qwen/Mistral and GPT-2).
DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "c_attn",
    "c_proj",
    "c_fc",
)

_PEFT_PREFIXES = ("base_model.model.",)


def canonical_name(name: str) -> str:
    """Module path in the base model: strip PEFT's wrapper prefix and `.base_layer` suffix."""
    for prefix in _PEFT_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return False
    return isinstance(module, LoraLayer)


def _is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    cls = type(module).__name__
    if cls in ("Linear4bit", "Linear8bitLt", "QuantLinear") or hasattr(weight, "quant_state"):
        return True
    return weight is not None and weight.dtype in (torch.int8, torch.uint8)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear or a GPT-2 Conv1D (whose weight is stored transposed)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    return module.weight.shape[0], module.weight.shape[1]


def lora_modules(model: nn.Module, adapter_name: str | None = None) -> dict[str, tuple[nn.Module, str]]:
    """LoRA layers of a PEFT model keyed by canonical name, with the adapter name to read."""
    out = {}
    for name, module in model.named_modules():
        if not is_lora_layer(module):
            continue
        adapter = adapter_name or module.active_adapters[0]
        if adapter not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise ValueError(
                f"module {name!r} uses DoRA; AlignGuard's closed forms assume plain LoRA (use_dora=False)"
            )
        out[canonical_name(name)] = (module, adapter)
    return out


def find_target_modules(model: nn.Module, target_modules=None) -> dict[str, nn.Module]:
    """Modules to hook, keyed by canonical name.

    On a PEFT model these are the LoRA layers (optionally filtered by `target_modules`); on a plain model the
    `nn.Linear` / `Conv1D` layers whose names end with one of `target_modules` (default: the usual
    projections). Never returns the `lm_head`.

    Raises:
        ValueError: if nothing matches (the message lists the linear layers that exist), or if a matched base
            layer is quantised (the factor would be estimated through dequantisation noise and the regulariser
            cannot read its LoRA geometry reliably; estimate on the fp16/bf16/fp32 model instead).
    """
    lora = {canonical_name(n): m for n, m in model.named_modules() if is_lora_layer(m)}
    if lora:
        found = lora if target_modules is None else {n: m for n, m in lora.items() if _matches(n, target_modules)}
    else:
        targets = tuple(target_modules) if target_modules is not None else DEFAULT_TARGET_MODULES
        found = {
            canonical_name(n): m
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and _matches(n, targets) and not n.endswith("lm_head")
        }
    if not found:
        linear_names = sorted(
            {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
        )
        raise ValueError(
            f"target_modules={list(target_modules) if target_modules else None} matched no module of "
            f"{type(model).__name__}; linear layer names in this model: {linear_names}. "
            "Pass target_modules with some of these names."
        )
    for name, module in found.items():
        base = module.get_base_layer() if is_lora_layer(module) else module
        if _is_quantized(base):
            raise ValueError(
                f"module {name!r} has a quantised base layer ({type(base).__name__}); AlignGuard needs the "
                "unquantised weights for the Fisher pass and the regulariser. Load the model in fp32/bf16 "
                "(no load_in_4bit/8bit) for estimation, or exclude this module from target_modules."
            )
    return found
