"""How the Fisher pass runs the model: zero-gradient modules, left padding, devices, train mode / checkpointing.

Run: python -m pytest -q tests/test_fisher_wiring.py
"""

import warnings

import pytest
import torch

from alignguard import AlignmentSubspaces, FisherConfig, FisherState, SubspaceConfig, build_subspaces, estimate_fisher
from alignguard.accumulator import FactorAccumulator
from alignguard.data import IGNORE_INDEX
from alignguard.model_pass import dropout_disabled, module_device, position_ids_from_mask
from alignguard.subspace import random_subspaces
from alignguard.tiny import make_tiny_model
from tests.helpers import tiny_batches, tiny_peft

EMPIRICAL = FisherConfig(fisher_labels="empirical", show_progress=False)
DEAD = [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]


def _dead_attention_model():
    """Layer 1's o_proj is zero, so its q/k/v outputs do not affect the loss: their output gradient is exactly 0."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    return model


# ---- 1. modules whose output gradient is zero -------------------------------------------------------------


@pytest.mark.parametrize("storage", ["dense", "sketch"])
def test_zero_gradient_module_gets_an_empty_subspace(storage, tmp_path):
    model = _dead_attention_model()
    cfg = FisherConfig(fisher_labels="empirical", fisher_storage=storage, sketch_rank=16, show_progress=False)
    with pytest.warns(UserWarning, match=r"all-zero output gradient.*layers\.1\.self_attn\.q_proj"):
        state = estimate_fisher(model, tiny_batches(), cfg)
    assert state.metadata["zero_gradient_modules"] == sorted(DEAD)
    assert all(state.raw_traces[n] == 0.0 for n in DEAD)
    assert all(state.raw_traces[n] > 0 for n in state.dims if n not in DEAD)
    subs = build_subspaces(state, SubspaceConfig(m_min=2))
    for name in DEAD:
        sub = subs.subspaces[name]
        assert sub.m == 0 and sub.basis.shape == (state.dims[name][0], 0) and sub.eigvals.shape == (0,)
        assert sub.energy == 0.0 and sub.residual == 0.0
    assert all(subs.subspaces[n].m >= 2 for n in state.dims if n not in DEAD)
    state.save(tmp_path)
    subs.save(tmp_path)
    loaded = FisherState.load(tmp_path, model=model, config=cfg)
    again = AlignmentSubspaces.load(tmp_path)
    assert again.subspaces[DEAD[0]].basis.shape == (state.dims[DEAD[0]][0], 0)
    assert build_subspaces(loaded, SubspaceConfig(m_min=2)).summary() == subs.summary()
    assert random_subspaces(again).subspaces[DEAD[0]].m == 0


# ---- 2. left padding ---------------------------------------------------------------------------------------


def _left_padded(batches):
    """The same rows with their right padding moved to the left."""
    out = []
    for b in batches:
        rows = {k: [] for k in b}
        for i in range(b["input_ids"].shape[0]):
            n_pad = int((b["attention_mask"][i] == 0).sum())
            for k in b:
                rows[k].append(torch.roll(b[k][i], n_pad))
        out.append({k: torch.stack(v) for k, v in rows.items()})
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padding_gives_the_same_factor(family):
    model = make_tiny_model(family).double()
    right = tiny_batches(batch_size=4)
    left = _left_padded(right)
    assert (left[0]["attention_mask"][:, 0] == 0).any()  # really left-padded
    single = tiny_batches(batch_size=1)
    ref = estimate_fisher(model, right, EMPIRICAL)
    for batches in (left, single):
        other = estimate_fisher(model, batches, EMPIRICAL)
        for name in ref.factors:
            # The sums are float32 (float64 model): 1e-5 is float32 round-off; without position ids GPT-2 is ~5% off.
            torch.testing.assert_close(other.factors[name], ref.factors[name], rtol=5e-5, atol=2e-5)
            assert other.raw_traces[name] == pytest.approx(ref.raw_traces[name], rel=1e-5)


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])
    assert torch.equal(position_ids_from_mask(mask), expected)


# ---- 3. devices --------------------------------------------------------------------------------------------


def test_module_device_helper():
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    fallback = torch.device("cpu")
    assert module_device(torch.nn.ReLU(), fallback) is fallback  # no weights
    assert module_device(torch.nn.Linear(2, 2, device="meta")) is None  # offloaded: decided by what it sends
    buffer_only = torch.nn.Module()
    buffer_only.register_buffer("b", torch.zeros(1))
    assert module_device(buffer_only) == torch.device("cpu")


def test_accumulator_uses_each_modules_own_device():
    cfg = FisherConfig(show_progress=False)
    acc = FactorAccumulator({"a": (3, 2), "b": (4, 2)}, cfg, {"a": torch.device("cpu"), "b": None})
    assert acc.sums["a"].device == torch.device("cpu") and "b" not in acc.sums  # b waits for its first tensor
    acc.positions = torch.tensor([[True, False, True]])
    acc.add("b", torch.ones(1, 3, 4, dtype=torch.float64))
    assert acc.sums["b"].device == torch.device("cpu") and acc.sums["b"].dtype == torch.float32
    torch.testing.assert_close(acc.sums["b"], torch.full((4, 4), 2.0))
    assert acc.counts["b"] == 2 and acc.counts["a"] == 0
    legacy = FactorAccumulator({"a": (3, 2)}, cfg, "cpu")  # one device for all (benchmarks/sketch_memory.py)
    assert legacy.sums["a"].device == torch.device("cpu")


def test_estimate_fisher_allocates_on_the_module_device(monkeypatch):
    """Every accumulator is allocated on the device its own module reports (CPU only here: a real multi-device
    split needs several accelerators and is not tested)."""
    model = make_tiny_model("llama")
    seen = {}
    original = FactorAccumulator.allocate

    def spy(self, name, device):
        seen.setdefault(name, torch.device(device))
        original(self, name, device)

    monkeypatch.setattr(FactorAccumulator, "allocate", spy)
    state = estimate_fisher(model, tiny_batches(), FisherConfig(show_progress=False))
    modules = dict(model.named_modules())
    assert set(seen) == set(state.dims)
    assert all(seen[n] == module_device(modules[n]) for n in state.dims)


# ---- 4. train mode, dropout, gradient checkpointing, use_cache ---------------------------------------------


def _flags(model):
    return {
        n: (m.training, getattr(m, "p", None), m.__dict__.get("attention_dropout")) for n, m in model.named_modules()
    }


def test_dropout_is_off_and_every_flag_is_restored():
    model = make_tiny_model("gpt2")  # resid/attn/embd dropout 0.1
    ref = estimate_fisher(model.eval(), tiny_batches(), EMPIRICAL)
    model.train()
    model.transformer.h[0].attn.eval()  # a mixed state must come back exactly
    before = _flags(model)
    state = estimate_fisher(model, tiny_batches(), EMPIRICAL)
    assert _flags(model) == before
    for name in ref.factors:  # dropout really off: the same factor as in eval mode
        torch.testing.assert_close(state.factors[name], ref.factors[name], rtol=1e-5, atol=1e-6)


def test_float_attention_dropout_is_zeroed_and_restored():
    model = make_tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.attention_dropout = 0.3
    model.train()
    inside = []
    with dropout_disabled(model):
        inside.append((attn.attention_dropout, attn.training))
    assert inside == [(0.0, True)] and attn.attention_dropout == 0.3
    peft = tiny_peft("llama")
    for layer in peft.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.2
    peft.train()
    before = _flags(peft)
    estimate_fisher(peft, tiny_batches(), EMPIRICAL)
    assert _flags(peft) == before


def test_gradient_checkpointing_stays_on_and_use_cache_is_off():
    model = make_tiny_model("llama")
    plain = estimate_fisher(model, tiny_batches(), FisherConfig(show_progress=False, input_factor=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    model.train()
    calls, during, kwargs_seen = [], [], []
    for layer in model.model.layers:
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
    layer0 = model.model.layers[0]
    layer0.register_forward_hook(lambda m, i, o: during.append(m.gradient_checkpointing and m.training))
    model.register_forward_pre_hook(lambda m, a, k: kwargs_seen.append(k.get("use_cache")), with_kwargs=True)
    ckpt = estimate_fisher(model, tiny_batches(), FisherConfig(show_progress=False, input_factor=True))
    assert calls and during and all(during)
    assert kwargs_seen and all(v is False for v in kwargs_seen)
    assert model.training
    for name in plain.factors:  # recomputation counts nothing twice (inputs are added once per batch)
        torch.testing.assert_close(ckpt.factors[name], plain.factors[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ckpt.input_factors[name], plain.input_factors[name], rtol=1e-5, atol=1e-6)
        assert ckpt.token_counts[name] == plain.token_counts[name]


def test_masked_labels_stay_masked_with_position_ids():
    """Padding rows that are entirely masked change nothing, also with position ids passed."""
    model = make_tiny_model("gpt2")
    batches = tiny_batches(batch_size=4)
    base = estimate_fisher(model, batches, EMPIRICAL)
    extra = [dict(b) for b in batches]
    extra[0] = {k: torch.cat([v, v[:1]]) for k, v in batches[0].items()}
    extra[0]["labels"][-1] = IGNORE_INDEX
    masked = estimate_fisher(model, extra, EMPIRICAL)
    for name in base.factors:
        torch.testing.assert_close(masked.factors[name], base.factors[name], rtol=1e-4, atol=1e-5)


# ---- speed-ups keep the factors ----------------------------------------------------------------------------


def test_logits_only_at_needed_positions_give_the_same_factor(monkeypatch):
    """`logits_to_keep` (no lm_head work on prompt columns) changes no number, also with sampled labels."""
    import alignguard.fisher as fisher_mod

    model = make_tiny_model("llama")
    batches = tiny_batches(batch_size=4)
    kept = []
    model.register_forward_pre_hook(lambda m, a, k: kept.append(k.get("logits_to_keep")), with_kwargs=True)
    cfg = FisherConfig(show_progress=False, input_factor=True)
    fast = estimate_fisher(model, batches, cfg)
    assert any(k is not None and len(k) < batches[0]["input_ids"].shape[1] for k in kept)
    accepts = fisher_mod.forward_accepts
    monkeypatch.setattr(fisher_mod, "forward_accepts", lambda m, arg: arg != "logits_to_keep" and accepts(m, arg))
    full = estimate_fisher(model, batches, cfg)
    for name in full.factors:
        torch.testing.assert_close(fast.factors[name], full.factors[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.input_factors[name], full.input_factors[name], rtol=1e-5, atol=1e-6)


def test_accumulator_matches_the_plain_masked_sum_and_skips_nonfinite_batches():
    gen = torch.Generator().manual_seed(0)
    acc = FactorAccumulator({"m": (5, 3)}, FisherConfig(show_progress=False), "cpu")
    ref, count = torch.zeros(5, 5, dtype=torch.float64), 0
    for i in range(5):
        rows = torch.randn(3, 7, 5, generator=gen)
        mask = torch.rand(3, 7, generator=gen) > 0.4
        if i == 1:
            rows[mask.nonzero()[0][0], mask.nonzero()[0][1], 2] = float("nan")
        if i == 3:
            rows[mask.nonzero()[-1][0], mask.nonzero()[-1][1], 0] = float("-inf")
        acc.positions = mask
        acc.add("m", rows)
        g = rows[mask].double()
        if torch.isfinite(g).all():
            ref += g.T @ g
            count += g.shape[0]
    assert acc.skipped["m"] == 2 and acc.counts["m"] == count
    torch.testing.assert_close(acc.sums["m"].double(), ref, rtol=1e-6, atol=1e-6)


def test_batches_without_an_attention_mask_still_work():
    model = make_tiny_model("gpt2")
    batches = [{k: v for k, v in b.items() if k != "attention_mask"} for b in tiny_batches(batch_size=1)]
    state = estimate_fisher(model, batches, EMPIRICAL)
    assert all(torch.isfinite(f).all() for f in state.factors.values())
