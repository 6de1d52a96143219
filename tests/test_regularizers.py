"""Closed-form AlignGuard terms vs their dense float64 definitions.

Run: python -m pytest -q tests/test_regularizers.py
"""

import math

import pytest
import torch

from alignguard import AlignGuardConfig, AlignGuardRegularizer, dense_reference_terms
from alignguard.distributed import whole_weight
from alignguard.regularizers import _quantile_rows, alignment_fraction
from alignguard.subspace import Subspace
from alignguard.targets import lora_modules
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


@pytest.mark.parametrize("zero", [{"lambda_t": 0.0}, {"lambda_nc": 0.0}, {"alpha": 1.0}, {"lambda_a": 0.0}])
def test_a_term_of_weight_zero_is_logged_detached_and_the_gradient_is_unchanged(zero):
    model = _model("llama", False)
    subs = random_subspaces_for(model, task_rank=5)
    cfg = AlignGuardConfig(
        geo_metric="task_fisher", task_metric="task_fisher", **{"lambda_t": 0.3, "lambda_nc": 0.7, **zero}
    )
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    terms = AlignGuardRegularizer(model, subs, cfg)()
    ref = dense_reference_terms(model, subs, cfg)
    c = cfg
    weights = {"alignment": c.lambda_a, "task": c.lambda_t, "overlap": c.lambda_nc * c.alpha}
    weights["geodesic"] = c.lambda_nc * (1 - c.alpha)
    for key, weight in weights.items():
        assert terms[key].requires_grad == (weight != 0), key
        torch.testing.assert_close(terms[key], ref[key], rtol=1e-9, atol=1e-12, msg=key)  # still logged, exact
    g_fast = torch.autograd.grad(terms["total"], params)
    g_ref = torch.autograd.grad(ref["total"], params)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


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
    # Fewer samples than any layer has entries (the tiny layers hold 32 x 32 or fewer): a block strictly smaller
    # than the matrix, so the estimate really varies from call to call.
    cfg = AlignGuardConfig(overlap="literal", overlap_exact_max_entries=0, overlap_samples=128)
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


# ---- unprotected LoRA layers ---------------------------------------------------------------------------------


def _qv_only(subs):
    subs.subspaces = {n: s for n, s in subs.subspaces.items() if n.endswith(("q_proj", "v_proj"))}
    return subs


def test_lora_layers_without_a_subspace_are_an_error_unless_allowed():
    """Fisher on q,v and LoRA on all 7 projections: 10 of 14 layers would get no term."""
    model = _model("llama", False)
    subs = _qv_only(random_subspaces_for(model))
    with pytest.raises(ValueError, match=r"10 of 14 LoRA layers have no alignment subspace") as err:
        AlignGuardRegularizer(model, subs)
    assert "model.layers.0.mlp.down_proj" in str(err.value)
    assert "fisher_modules" in str(err.value) and "allow_unprotected=True" in str(err.value)
    assert "--allow_unprotected true" in str(err.value)
    cfg = AlignGuardConfig(allow_unprotected=True)
    with pytest.warns(UserWarning, match="10 of 14 LoRA layers"):
        reg = AlignGuardRegularizer(model, subs, cfg)
    assert reg.unprotected == sorted(n for n in lora_modules(model) if not n.endswith(("q_proj", "v_proj")))
    assert reg.n_modules == 4
    fast, ref = reg(), dense_reference_terms(model, subs, cfg)
    for key in ("alignment", "task", "overlap", "total"):
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-9, atol=1e-12, msg=key)
    full = AlignGuardRegularizer(model, random_subspaces_for(model))
    assert full.unprotected == []


def test_empty_subspaces_give_no_alignment_penalty_and_match_the_reference():
    """m = 0 (zero-gradient modules): a whole group with empty bases, and one empty basis among non-empty ones."""
    model = _model("llama", False)
    subs = random_subspaces_for(model, task_rank=3)
    empty = [n for n in subs.subspaces if n.endswith(("k_proj", "v_proj"))]  # the whole 16 x 32 group
    empty.append("model.layers.0.self_attn.q_proj")  # padded beside layer 1's q_proj
    for name in empty:
        d_out = subs.subspaces[name].basis.shape[0]
        subs.subspaces[name] = Subspace(
            torch.zeros(d_out, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), float(d_out)
        )
    cfg = AlignGuardConfig(geo_metric="task_fisher", task_metric="task_fisher")
    reg = AlignGuardRegularizer(model, subs, cfg)
    fast, ref = reg(), dense_reference_terms(model, subs, cfg)
    for key in ("alignment", "task", "overlap", "geodesic", "total"):
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-9, atol=1e-12, msg=key)
    per_module = reg.module_terms()
    for name in empty:
        assert per_module[name]["alignment"] == 0.0 and per_module[name]["overlap"] == 0.0
        assert per_module[name]["task"] > 0  # the whole update counts as task direction
    assert all(math.isfinite(v) for terms in per_module.values() for v in terms.values())
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(fast["total"], params))


def test_nonfinite_factors_are_refused_naming_the_module():
    model = _model("llama", False)
    subs = random_subspaces_for(model)
    name = sorted(subs.subspaces)[3]
    subs.subspaces[name].eigvals[0] = float("nan")
    with pytest.raises(ValueError, match=rf"NaN/inf values .*{name}.*eigvals"):
        AlignGuardRegularizer(model, subs)


# ---- reduction and normalise ---------------------------------------------------------------------------------


def _with_raw_traces(model):
    subs = random_subspaces_for(model, task_rank=4)
    gen = torch.Generator().manual_seed(7)
    subs.metadata["raw_traces"] = {
        n: float(s.basis.shape[0]) * float(torch.rand((), generator=gen, dtype=torch.float64) * 50 + 0.1)
        for n, s in subs.subspaces.items()
    }
    return subs


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("normalise", ["per_layer", "global", "none"])
def test_reduction_and_normalise_equal_dense_reference(reduction, normalise):
    model = _model("llama", False)
    subs = _with_raw_traces(model)
    cfg = AlignGuardConfig(reduction=reduction, normalise=normalise, geo_metric="task_fisher", lambda_nc=0.5)
    fast, ref = AlignGuardRegularizer(model, subs, cfg)(), dense_reference_terms(model, subs, cfg)
    for key in ("alignment", "task", "overlap", "geodesic", "total"):
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-9, atol=1e-12, msg=key)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for a, b in zip(torch.autograd.grad(fast["total"], params), torch.autograd.grad(ref["total"], params)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    base = AlignGuardRegularizer(model, subs, AlignGuardConfig(geo_metric="task_fisher", lambda_nc=0.5))()
    n = len(subs.subspaces)
    factor = n if reduction == "sum" else 1
    # Only the alignment eigenvalues are rescaled: the task term changes by the reduction alone.
    torch.testing.assert_close(fast["task"], base["task"] * factor, rtol=1e-12, atol=0.0)
    if normalise == "per_layer":
        torch.testing.assert_close(fast["alignment"], base["alignment"] * factor, rtol=1e-12, atol=0.0)
    else:
        assert not torch.isclose(fast["alignment"], base["alignment"] * factor, rtol=1e-3)


def test_normalise_without_raw_traces_is_a_clear_error():
    model = _model("llama", False)
    subs = _with_raw_traces(model)
    del subs.metadata["raw_traces"]
    with pytest.raises(ValueError, match=r"normalise='global' needs the raw traces.*normalise='per_layer'"):
        AlignGuardRegularizer(model, subs, AlignGuardConfig(normalise="global"))


def test_reduction_and_normalise_are_validated_and_usable_as_compare_rows():
    from alignguard.recipes.compare import method_spec

    for field, bad in (("reduction", "max"), ("normalise", "layer")):
        with pytest.raises(ValueError, match=rf"^{field}: must be"):
            AlignGuardConfig(**{field: bad})
    for row, field, value in (
        ("alignguard@reduction=sum", "reduction", "sum"),
        ("alignguard@normalise=global", "normalise", "global"),
        ("alignguard@normalise=none", "normalise", "none"),
        ("alignguard@allow_unprotected=true", "allow_unprotected", True),
    ):
        assert getattr(AlignGuardConfig(**method_spec(row)["ag"]), field) == value, row


# ---- overlap: running tau and its own random generator -------------------------------------------------------


def test_running_tau_starts_at_the_first_observed_quantile():
    model = _model("llama", False)
    subs = random_subspaces_for(model)
    cfg = AlignGuardConfig(overlap_tau_samples=0)  # exact quantile over every entry
    reg = AlignGuardRegularizer(model, subs, cfg)
    reg()
    layers = lora_modules(model)
    for group in reg.groups:
        for i, name in enumerate(group.names):
            layer, ad = layers[name]
            dw = (
                float(layer.scaling[ad])
                * whole_weight(layer.lora_B[ad].weight)
                @ whole_weight(layer.lora_A[ad].weight)
            )
            q = _quantile_rows(dw.detach().abs().flatten()[None], cfg.overlap_quantile)[0]
            torch.testing.assert_close(group.tau[i], q, rtol=1e-12, atol=0.0)


def test_sampled_overlap_leaves_the_global_rng_alone_and_is_seeded():
    model = _model("llama", False)
    subs = random_subspaces_for(model)
    cfg = AlignGuardConfig(overlap_exact_max_entries=0, overlap_samples=256, overlap_tau_samples=64)
    state = torch.random.get_rng_state()
    with torch.no_grad():
        first = [AlignGuardRegularizer(model, subs, cfg, seed=3)()["overlap"] for _ in range(2)]
        other = AlignGuardRegularizer(model, subs, cfg, seed=4)()["overlap"]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first[0] == first[1] and first[0] != other  # same seed, same draws; another seed, other draws
