"""mode="project": U cached once per device in float32, projections computed in float32, empty subspaces.

Run: python -m pytest -q tests/test_projection_precision.py
"""

import torch

from alignguard.projection import SubspaceProjector, project_lora_weights_
from alignguard.subspace import Subspace
from alignguard.targets import lora_modules
from tests.helpers import random_subspaces_for, randomize_lora_, tiny_peft


def _bf16_model_mostly_inside_u():
    """lora_B in bf16, each B mostly inside its U (so a bf16 U's rounding of the large part shows)."""
    model = tiny_peft("llama")
    randomize_lora_(model)
    subs = random_subspaces_for(model, dtype=torch.float32, m_of=lambda i: 4)
    gen = torch.Generator().manual_seed(1)
    for name, (layer, adapter) in lora_modules(model).items():
        u, weight = subs.subspaces[name].basis, layer.lora_B[adapter].weight
        with torch.no_grad():
            weight.copy_(
                u @ torch.randn(u.shape[1], weight.shape[1], generator=gen)
                + 0.05 * torch.randn(weight.shape, generator=gen)
            )
        layer.lora_B[adapter].to(torch.bfloat16)
    return model, subs


def test_bf16_projection_is_the_rounded_fp32_projection():
    model, subs = _bf16_model_mostly_inside_u()
    before = {n: layer.lora_B[a].weight.detach().clone() for n, (layer, a) in lora_modules(model).items()}
    assert project_lora_weights_(model, subs) == len(before)
    for name, (layer, adapter) in lora_modules(model).items():
        u, b0 = subs.subspaces[name].basis, before[name].float()
        weight = layer.lora_B[adapter].weight
        assert weight.dtype == torch.bfloat16
        exact = b0 - u @ (u.T @ b0)
        assert torch.equal(weight, exact.to(torch.bfloat16)), name  # only the result is rounded
        u16 = u.to(torch.bfloat16)
        with_bf16_u = before[name] - u16 @ (u16.T @ before[name])  # the constraint with a bf16 copy of U
        ours, theirs = (u.T @ weight.float()).abs().max(), (u.T @ with_bf16_u.float()).abs().max()
        assert ours < theirs / 5, (name, float(ours), float(theirs))


def test_basis_is_copied_to_the_device_once_and_reused_by_hooks_and_steps():
    model, subs = _bf16_model_mostly_inside_u()
    projector = SubspaceProjector(model, subs)
    name = sorted(projector.layers)[0]
    device = projector.layers[name][0].lora_B[projector.layers[name][1]].weight.device
    first = projector.basis(name, device)
    assert first.dtype == torch.float32
    handles = projector.attach_hooks()
    for _ in range(3):
        projector.project_()
        loss = sum(layer.lora_B[a].weight.float().sum() for layer, a in projector.layers.values())
        loss.backward()
    assert projector.basis(name, device) is first  # the same cached tensor, no copy per call
    assert len(projector._cache) == len(projector.layers)  # one entry per layer and device, not per call
    for n, (layer, adapter) in projector.layers.items():
        grad = layer.lora_B[adapter].weight.grad
        u = subs.subspaces[n].basis
        assert grad.dtype == torch.bfloat16
        assert (u.T @ grad.float()).abs().max() <= 1e-2 * grad.float().abs().max(), n
    for h in handles:
        h.remove()


def test_empty_subspace_leaves_lora_b_unchanged_and_hooks_work():
    """m = 0 (a module whose alignment gradient was zero): nothing to remove, no crash."""
    model = tiny_peft("llama")
    randomize_lora_(model)
    subs = random_subspaces_for(model, dtype=torch.float32)
    empty = sorted(subs.subspaces)[:3]
    for name in empty:
        d_out = subs.subspaces[name].basis.shape[0]
        subs.subspaces[name] = Subspace(torch.zeros(d_out, 0), torch.zeros(0), float(d_out))
    layers = lora_modules(model)
    before = {n: layers[n][0].lora_B[layers[n][1]].weight.detach().clone() for n in empty}
    projector = SubspaceProjector(model, subs)
    handles = projector.attach_hooks()
    assert projector.project_() == len(layers) - len(empty)
    for name in empty:
        layer, adapter = layers[name]
        assert torch.equal(layer.lora_B[adapter].weight, before[name])
        layer(torch.ones(1, layer.in_features)).sum().backward()
        assert layer.lora_B[adapter].weight.grad is not None
    for h in handles:
        h.remove()
