"""Hard projection of LoRA updates out of the alignment subspaces (`mode="project"`).

Since dW_A = U U^T dW = s (U U^T B) A, keeping U^T B = 0 keeps the update entirely out of the alignment
subspace. Two pieces, as PEFT's OSF does for its own subspaces:
- a gradient hook on every `lora_B` weight: grad <- grad - U (U^T grad);
- a weight projection after each optimizer step: B <- B - U (U^T B). Adam's per-coordinate scaling (and
  weight decay) do not preserve the column space of projected gradients, so the gradient hook alone leaves a
  small U-component; projecting the weights makes the constraint exact.
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import is_dtensor
from .subspace import AlignmentSubspaces
from .targets import lora_modules


def _remove_component(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    basis = basis.to(device=matrix.device, dtype=matrix.dtype)
    return matrix - basis @ (basis.T @ matrix)


def attach_projection_hooks(model: nn.Module, subspaces: AlignmentSubspaces) -> list:
    """Register `grad -= U U^T grad` hooks on every lora_B weight that has a subspace; returns the handles.

    Remove them with `detach_projection_hooks(handles)`.

    Raises:
        NotImplementedError: if the LoRA weights are FSDP2 shards (`DTensor`): FSDP2 writes the task gradient into
            the sharded parameter's `.grad` directly, so a hook on it would never see that gradient.
    """
    handles = []
    for name, (layer, adapter) in lora_modules(model).items():
        sub = subspaces.subspaces.get(name)
        if sub is None:
            continue
        weight = layer.lora_B[adapter].weight
        if is_dtensor(weight):
            raise NotImplementedError(
                f"mode='project' with FSDP2-sharded LoRA weights ({name}): the gradient hook would miss the task "
                "gradient. Use mode='penalty' under FSDP2, or DDP / DeepSpeed for mode='project'."
            )
        handles.append(weight.register_hook(lambda grad, basis=sub.basis: _remove_component(grad, basis)))
    return handles


def detach_projection_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


@torch.no_grad()
def project_lora_weights_(model: nn.Module, subspaces: AlignmentSubspaces) -> int:
    """In place, B <- B - U U^T B for every LoRA layer with a subspace; returns the number of layers projected."""
    count = 0
    for name, (layer, adapter) in lora_modules(model).items():
        sub = subspaces.subspaces.get(name)
        if sub is None:
            continue
        weight = layer.lora_B[adapter].weight
        weight.copy_(_remove_component(weight, sub.basis))
        count += 1
    return count
