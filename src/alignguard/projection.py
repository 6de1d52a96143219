"""Hard projection of LoRA updates out of the alignment subspaces (`mode="project"`).

Since dW_A = U U^T dW = s (U U^T B) A, keeping U^T B = 0 keeps the update entirely out of the alignment
subspace. Two pieces, as PEFT's OSF does for its own subspaces:
- a gradient hook on every `lora_B` weight: grad <- grad - U (U^T grad);
- a weight projection after each optimizer step: B <- B - U (U^T B). Adam's per-coordinate scaling (and
  weight decay) do not preserve the column space of projected gradients, so the gradient hook alone leaves a
  small U-component; projecting the weights makes the constraint exact.

`SubspaceProjector` keeps every U in float32 on the weight's device, copied there once: the hook runs on every
backward and the weight projection on every step, so a host-to-device copy per call would be paid thousands of
times. The projection is computed in float32 and only the result is cast to the weight's dtype, so with bf16
LoRA weights U^T B is at the bf16 rounding of B (a bf16 U would be off by its own rounding as well).
Modules whose subspace is empty (m = 0) have nothing to remove and are skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import is_dtensor
from .subspace import AlignmentSubspaces
from .targets import lora_modules


def _remove_component(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """matrix - U (U^T matrix), computed in float32 (or float64), returned in matrix's dtype."""
    x = matrix if matrix.dtype == torch.float64 else matrix.float()
    basis = basis.to(x.dtype)
    return (x - basis @ (basis.T @ x)).to(matrix.dtype)


class SubspaceProjector:
    """Removes each alignment subspace from its LoRA layer's lora_B (weights and gradients).

    Args:
        model: a PEFT model.
        subspaces: `AlignmentSubspaces` keyed by canonical module names; layers without one are left alone.

    The bases are cached per device in float32 (float64 stays float64) the first time they are needed.
    """

    def __init__(self, model: nn.Module, subspaces: AlignmentSubspaces):
        self.model = model
        self.layers: dict[str, tuple[nn.Module, str]] = {}
        self._host: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}
        for name, (layer, adapter) in lora_modules(model).items():
            sub = subspaces.subspaces.get(name)
            if sub is None or sub.m == 0:
                continue
            self.layers[name] = (layer, adapter)
            basis = sub.basis.detach()
            self._host[name] = basis if basis.dtype == torch.float64 else basis.float()

    def basis(self, name: str, device: torch.device) -> torch.Tensor:
        """U of module `name` on `device` (copied there on the first call only)."""
        key = (name, device)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._host[name].to(device).contiguous()
        return cached

    @torch.no_grad()
    def project_(self) -> int:
        """In place, B <- B - U U^T B for every layer with a subspace; returns the number of layers projected."""
        for name, (layer, adapter) in self.layers.items():
            weight = layer.lora_B[adapter].weight
            weight.copy_(_remove_component(weight, self.basis(name, weight.device)))
        return len(self.layers)

    def attach_hooks(self) -> list:
        """Register `grad -= U U^T grad` hooks on every projected lora_B weight; returns the handles.

        Raises:
            NotImplementedError: if the LoRA weights are FSDP2 shards (`DTensor`): FSDP2 writes the task gradient
                into the sharded parameter's `.grad` directly, so a hook on it would never see that gradient.
        """
        handles = []
        for name, (layer, adapter) in self.layers.items():
            weight = layer.lora_B[adapter].weight
            if is_dtensor(weight):
                raise NotImplementedError(
                    f"mode='project' with FSDP2-sharded LoRA weights ({name}): the gradient hook would miss the task "
                    "gradient. Use mode='penalty' under FSDP2, or DDP / DeepSpeed for mode='project'."
                )
            handles.append(
                weight.register_hook(lambda grad, n=name: _remove_component(grad, self.basis(n, grad.device)))
            )
        return handles


def attach_projection_hooks(model: nn.Module, subspaces: AlignmentSubspaces) -> list:
    """Register `grad -= U U^T grad` hooks on every lora_B weight that has a subspace; returns the handles.

    Remove them with `detach_projection_hooks(handles)`. See `SubspaceProjector.attach_hooks`.
    """
    return SubspaceProjector(model, subspaces).attach_hooks()


def detach_projection_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def project_lora_weights_(model: nn.Module, subspaces: AlignmentSubspaces) -> int:
    """In place, B <- B - U U^T B for every LoRA layer with a subspace; returns the number of layers projected.

    One-shot: it copies the bases to the device each call. Keep a `SubspaceProjector` to project repeatedly.
    """
    return SubspaceProjector(model, subspaces).project_()
