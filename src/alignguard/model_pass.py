"""Running a gradient pass over a user's model without changing it (used by the Fisher pass).

- `dropout_disabled`: dropout off *without* `model.eval()`, because HF models checkpoint activations only
  `if self.gradient_checkpointing and self.training`; an eval() pass inside a checkpointed run would need the
  full activation memory.
- `module_device`: where a module's weights live, so per-module buffers follow a model dispatched over several
  devices (`device_map`).
- `position_ids_from_mask`: positions of left-padded rows, as `generate` computes them.
- `forward_accepts`: whether the model's forward takes an argument (`position_ids`, `logits_to_keep`).
"""

from __future__ import annotations

import inspect
import itertools
from contextlib import contextmanager

import torch


def module_device(module: torch.nn.Module, fallback: torch.device | None = None) -> torch.device | None:
    """Where `module`'s weights live: the device of its first parameter or buffer that is not on "meta" (an
    offloaded module, whose weights are loaded only for its forward), else `fallback`."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type != "meta":
            return t.device
    return fallback


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens (cumsum - 1, 0 on left padding), as `generate` computes them, so a
    left-padded row sees the positions it would see alone (absolute-position models such as GPT-2 need it)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


# Float rates that HF modules apply only `if self.training` (attention dropout; the MoE router noise of Mixtral-style
# blocks). Other train-only randomness a model may have is not known here.
_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "dropout_p", "jitter_noise", "router_jitter_noise")


@contextmanager
def dropout_disabled(model: torch.nn.Module):
    """Dropout off without `model.eval()`: every Dropout module gets p = 0 (and eval), float dropout / router-noise
    rates of attention and MoE modules become 0; the other training flags stay, so HF gradient checkpointing (which runs only
    `if self.gradient_checkpointing and self.training`) stays on. Everything is restored on exit."""
    saved = []
    try:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                saved.append((module, "p", module.p, module.training))
                module.p = 0.0
                module.training = False
            for attr in _DROPOUT_ATTRS:
                value = module.__dict__.get(attr)
                if isinstance(value, float) and not isinstance(value, bool):
                    saved.append((module, attr, value, None))
                    setattr(module, attr, 0.0)
        yield
    finally:
        for module, attr, value, training in saved:
            setattr(module, attr, value)
            if training is not None:
                module.training = training


def forward_accepts(model, argument: str) -> bool:
    """Whether the (base) model's `forward` takes `argument` by name (PEFT's wrapper passes it through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return argument in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
