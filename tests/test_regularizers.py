"""Closed-form AlignGuard terms vs their dense float64 definitions.

Run: python -m pytest -q tests/test_regularizers.py
"""

import pytest
import torch

from alignguard import AlignGuardConfig, AlignGuardRegularizer, dense_reference_terms
from alignguard.regularizers import alignment_fraction
from tests.helpers import random_subspaces_for, randomize_lora_, tiny_peft

CASES = [
    ("llama", False),
    ("llama", True),  # rsLoRA scale alpha / sqrt(r)
    ("qwen2", False),
    ("gpt2", False),  # Conv1D layers, fan_in_fan_out
]
METRICS = [("euclidean", "identity"), ("task_fisher", "identity"), ("task_fisher", "task_fisher")]


def _model(family, rslora):
    model = tiny_peft(family, r=4, alpha=8, rslora=rslora).double()
    randomize_lora_(model)
    return model


@pytest.mark.parametrize("family,rslora", CASES)
@pytest.mark.parametrize("geo,task", METRICS)
def test_closed_forms_equal_dense_reference(family, rslora, geo, task):
    model = _model(family, rslora)
    subs = random_subspaces_for(model, task_rank=5)
    cfg = AlignGuardConfig(geo_metric=geo, task_metric=task)
    fast = AlignGuardRegularizer(model, subs, cfg)()
    ref = dense_reference_terms(model, subs, cfg)
    for key in ("alignment", "task", "overlap", "geodesic", "total"):
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-9, atol=1e-12, msg=key)
    assert fast["alignment"] > 0 and fast["task"] > 0 and fast["overlap"] > 0
    if geo == "euclidean":
        assert fast["geodesic"] < 1e-12  # U U^T is an orthogonal projector: literally zero
    else:
        assert fast["geodesic"] > 1e-6


@pytest.mark.parametrize("family,rslora", CASES)
def test_gradients_equal_dense_reference(family, rslora):
    model = _model(family, rslora)
    subs = random_subspaces_for(model, task_rank=5)
    cfg = AlignGuardConfig(geo_metric="task_fisher", task_metric="task_fisher", lambda_t=0.3, lambda_nc=0.7)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    g_fast = torch.autograd.grad(AlignGuardRegularizer(model, subs, cfg)()["total"], params)
    g_ref = torch.autograd.grad(dense_reference_terms(model, subs, cfg)["total"], params)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in g_fast)


@pytest.mark.parametrize("family,rslora", CASES)
def test_kfac_alignment_term_equals_dense_reference_values_and_gradients(family, rslora):
    """R_A = tr(G_U dW_A A_in dW_A^T) with A_in = P diag(rho) P^T + sigma (I - P P^T), ranks differing per module."""
    model = _model(family, rslora)
    subs = random_subspaces_for(model, task_rank=5, input_rank_of=lambda i: 3 + i % 3)
    cfg = AlignGuardConfig(alignment_input="kfac", geo_metric="task_fisher", lambda_t=0.3, lambda_nc=0.7)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    fast, ref = AlignGuardRegularizer(model, subs, cfg)(), dense_reference_terms(model, subs, cfg)
    for key in ("alignment", "task", "geodesic", "total"):
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-9, atol=1e-12, msg=key)
    one_sided = AlignGuardRegularizer(model, subs, AlignGuardConfig())()["alignment"]
    assert abs(fast["alignment"] - one_sided) > 1e-3 * one_sided  # the input metric does change R_A
    g_fast = torch.autograd.grad(fast["total"], params)
    g_ref = torch.autograd.grad(ref["total"], params)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_kfac_with_isotropic_input_factor_equals_one_sided_term():
    """A_in = I (rho = sigma = 1) must give back the one-sided R_A exactly."""
    model = _model("llama", False)
    subs = random_subspaces_for(model, input_rank_of=lambda i: 2)
    for f in subs.input_factors.values():
        f.eigvals = torch.ones_like(f.eigvals)  # trace d_in, so the residual sigma is 1 too
    kfac = AlignGuardRegularizer(model, subs, AlignGuardConfig(alignment_input="kfac"))()["alignment"]
    plain = AlignGuardRegularizer(model, subs, AlignGuardConfig())()["alignment"]
    torch.testing.assert_close(kfac, plain, rtol=1e-12, atol=0.0)


def test_kfac_without_input_factors_is_a_clear_error():
    model = _model("llama", False)
    with pytest.raises(ValueError, match="input_factor=True"):
        AlignGuardRegularizer(model, random_subspaces_for(model), AlignGuardConfig(alignment_input="kfac"))


def test_gradcheck_single_module():
    """torch.autograd.gradcheck of every term (literal overlap: its tau does not move under perturbation)."""
    model = tiny_peft("llama", r=2, targets=["q_proj"]).double()
    randomize_lora_(model)
    subs = random_subspaces_for(model, task_rank=3)
    cfg = AlignGuardConfig(geo_metric="task_fisher", task_metric="task_fisher", overlap="literal", lambda_nc=1.0)
    reg = AlignGuardRegularizer(model, subs, cfg)

    class Total(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self):
            return reg()["total"]

    names = [n for n, _ in model.named_parameters() if "lora_" in n and "layers.0." in n]
    wrapper = Total()
    inputs = tuple(dict(model.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)

    def total(*tensors):
        return torch.func.functional_call(wrapper, {f"model.{n}": t for n, t in zip(names, tensors)}, ())

    assert torch.autograd.gradcheck(total, inputs, eps=1e-6, atol=1e-6)


def test_sampled_overlap_is_unbiased():
    model = _model("llama", False)
    subs = random_subspaces_for(model)
    exact = AlignGuardRegularizer(model, subs, AlignGuardConfig(overlap="literal"))()["overlap"]
    cfg = AlignGuardConfig(overlap="literal", overlap_exact_max_entries=0, overlap_samples=2048)
    reg = AlignGuardRegularizer(model, subs, cfg)
    assert not any(g.exact_overlap for g in reg.groups)
    torch.manual_seed(0)
    with torch.no_grad():
        estimates = torch.stack([reg()["overlap"] for _ in range(40)])
    mean, sem = estimates.mean(), estimates.std() / 40**0.5
    assert abs(mean - exact) < 4 * sem + 1e-12
    assert estimates.std() > 0  # it really is sampling


def test_all_terms_zero_at_init():
    model = tiny_peft("llama")  # PEFT init: B = 0
    subs = random_subspaces_for(model, task_rank=4, dtype=torch.float32)
    terms = AlignGuardRegularizer(model, subs, AlignGuardConfig())()
    for key, value in terms.items():
        assert float(value.detach()) == 0.0, key


def test_modules_grouped_by_shape_with_padding():
    model = _model("llama", False)
    subs = random_subspaces_for(model, m_of=lambda i: 1 + i % 5)
    reg = AlignGuardRegularizer(model, subs, AlignGuardConfig())
    # tiny llama: q/o (32x32), k/v (16x32), gate/up (64x32), down (32x64) -> 4 shapes over 14 modules
    assert len(reg.groups) == 4 and reg.n_modules == 14
    assert len({g.basis.shape[2] for g in reg.groups}) >= 1


def test_alignment_fraction_matches_definition():
    model = _model("llama", False)
    subs = random_subspaces_for(model)
    frac = alignment_fraction(model, subs)
    assert 0 < frac < 1


def test_no_matching_subspace_is_a_clear_error():
    model = _model("llama", False)
    subs = random_subspaces_for(model)
    subs.subspaces = {"other." + k: v for k, v in subs.subspaces.items()}
    with pytest.raises(ValueError, match="none of the"):
        AlignGuardRegularizer(model, subs)


def test_task_fisher_metric_without_task_factors_is_an_error():
    model = _model("llama", False)
    subs = random_subspaces_for(model)
    with pytest.raises(ValueError, match="task factors"):
        AlignGuardRegularizer(model, subs, AlignGuardConfig(task_metric="task_fisher"))


def test_buffers_follow_the_weights_to_their_device():
    """Engines (FSDP, DeepSpeed) move the model after the trainer built the regulariser: the bases must follow."""
    model = _model("llama", False)
    reg = AlignGuardRegularizer(model, random_subspaces_for(model, input_rank_of=lambda i: 2), AlignGuardConfig())
    assert all(g.basis.device.type == "cpu" for g in reg.groups)
    model.to("meta")  # a device other than the CPU, available everywhere (shapes only)
    terms = reg()
    assert terms["total"].device.type == "meta"
    assert all(g.basis.device.type == "meta" and g.scales.device.type == "meta" for g in reg.groups)
