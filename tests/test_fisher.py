"""Fisher factors: explicit per-token reference, masking, hook hygiene, cache, errors, sketch mode.

Run: python -m pytest -q tests/test_fisher.py
"""

import warnings

import pytest
import torch

from alignguard import FisherConfig, FisherMismatchError, FisherState, estimate_fisher
from alignguard.data import IGNORE_INDEX, make_batches
from alignguard.targets import find_target_modules
from alignguard.tiny import make_tiny_model, make_tiny_tokenizer
from tests.helpers import PAIRS, tiny_batches, tiny_peft

EMPIRICAL = FisherConfig(fisher_labels="empirical", show_progress=False)


def explicit_factors(model, batches, names):
    """Reference: capture each module output, take d(sum of response NLL)/d(output) with autograd.grad and sum
    g g^T over response-predicting positions, one position at a time."""
    modules = find_target_modules(model, names)
    sums = {n: torch.zeros(m.weight.shape[0], m.weight.shape[0], dtype=torch.float64) for n, m in modules.items()}
    count = 0
    for batch in batches:
        outputs = {}
        handles = [
            m.register_forward_hook(lambda _m, _i, out, n=n, store=outputs: store.__setitem__(n, out))
            for n, m in modules.items()
        ]
        emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits
        for h in handles:
            h.remove()
        labels = batch["labels"]
        loss = torch.zeros((), dtype=torch.float64)
        positions = []
        for b in range(labels.shape[0]):
            for t in range(labels.shape[1] - 1):
                if labels[b, t + 1] != IGNORE_INDEX:
                    loss = loss - torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]]
                    positions.append((b, t))
        grads = torch.autograd.grad(loss, [outputs[n] for n in modules])
        for n, g in zip(modules, grads):
            for b, t in positions:
                v = g[b, t].double()
                sums[n] += torch.outer(v, v)
        count += len(positions)
    out = {}
    for n, s in sums.items():
        f = s / count
        out[n] = f * (f.shape[0] / torch.trace(f))
    return out, count


def test_factor_equals_explicit_per_token_computation():
    model = make_tiny_model("llama")
    batches = tiny_batches()
    state = estimate_fisher(model, batches, EMPIRICAL)
    names = ["q_proj", "v_proj", "down_proj"]
    ref, count = explicit_factors(model, batches, names)
    for name, factor in ref.items():
        torch.testing.assert_close(state.factors[name].double(), factor, rtol=1e-4, atol=1e-5)
        assert state.token_counts[name] == count
        assert torch.isclose(state.factors[name].trace(), torch.tensor(float(factor.shape[0])), rtol=1e-5)


def test_input_factor_equals_explicit_per_token_computation():
    """A_in = mean over response-predicting positions of x x^T (x = the module input), trace-normalised to d_in."""
    model = make_tiny_model("llama")
    batches = tiny_batches()
    state = estimate_fisher(
        model, batches, FisherConfig(fisher_labels="empirical", show_progress=False, input_factor=True)
    )
    modules = find_target_modules(model, ["q_proj", "down_proj"])
    for name, module in modules.items():
        d_in = module.weight.shape[1]
        total, count = torch.zeros(d_in, d_in, dtype=torch.float64), 0
        for batch in batches:
            seen = []
            handle = module.register_forward_hook(lambda _m, inp, _o, seen=seen: seen.append(inp[0].detach()))
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            handle.remove()
            labels = batch["labels"]
            for b in range(labels.shape[0]):
                for t in range(labels.shape[1] - 1):
                    if labels[b, t + 1] != IGNORE_INDEX:
                        x = seen[0][b, t].double()
                        total += torch.outer(x, x)
                        count += 1
        ref = total / count
        ref = ref * (d_in / torch.trace(ref))
        torch.testing.assert_close(state.input_factors[name].double(), ref, rtol=1e-4, atol=1e-5)
    assert not EMPIRICAL.input_factor and not estimate_fisher(model, batches, EMPIRICAL).input_factors


def test_input_factor_round_trip_subspaces_and_sketch(tmp_path):
    from alignguard import SubspaceConfig, build_subspaces
    from alignguard.subspace import AlignmentSubspaces

    model = make_tiny_model("llama")
    batches = tiny_batches(n_repeat=4)
    cfg = FisherConfig(fisher_labels="empirical", show_progress=False, input_factor=True)
    state = estimate_fisher(model, batches, cfg)
    state.save(tmp_path / "f")
    loaded = FisherState.load(tmp_path / "f", model=model, config=cfg)
    assert sorted(loaded.input_factors) == sorted(state.input_factors)
    subs = build_subspaces(loaded, SubspaceConfig(input_rank=6))
    name = "model.layers.0.self_attn.q_proj"
    f = subs.input_factors[name]
    eig = torch.linalg.eigvalsh(state.input_factors[name].double()).flip(0)
    torch.testing.assert_close(f.eigvals.double(), eig[:6], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(f.residual, dtype=torch.float64), eig[6:].mean(), rtol=1e-4, atol=1e-5)
    subs.save(tmp_path / "s")
    again = AlignmentSubspaces.load(tmp_path / "s")
    torch.testing.assert_close(again.input_factors[name].basis, f.basis)
    # The sketch mode gives the same top input directions (a decaying activation spectrum, k = d_in here).
    sketch = estimate_fisher(
        model, batches, FisherConfig(**{**cfg.to_dict(), "fisher_storage": "sketch", "sketch_rank": 64})
    )
    top = build_subspaces(sketch, SubspaceConfig(input_rank=3)).input_factors[name].basis
    cos = torch.linalg.svdvals(top.T.double() @ f.basis[:, :3].double())
    assert cos.min() > 0.99


def test_masked_tokens_do_not_contribute():
    model = make_tiny_model("llama")
    batches = tiny_batches(batch_size=4)
    base = estimate_fisher(model, batches, EMPIRICAL)
    # Same data plus a fully masked row (prompt-only): the factor must not change.
    extra = [dict(b) for b in batches]
    for key in ("input_ids", "attention_mask", "labels"):
        row = extra[0][key][:1].clone()
        if key == "labels":
            row[:] = IGNORE_INDEX
        extra[0][key] = torch.cat([extra[0][key], row])
    masked = estimate_fisher(model, extra, EMPIRICAL)
    for name in base.factors:
        torch.testing.assert_close(masked.factors[name], base.factors[name], rtol=1e-4, atol=1e-5)
        assert masked.token_counts[name] == base.token_counts[name]


def test_hooks_removed_and_model_state_restored():
    model = make_tiny_model("llama")
    model.train()
    outside = []
    q = model.model.layers[0].self_attn.q_proj
    q.register_forward_hook(lambda *a: outside.append(1))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    estimate_fisher(model, tiny_batches(), FisherConfig(show_progress=False))
    assert len(q._forward_hooks) == 1  # the external hook stays, ours is gone
    assert all(len(m._forward_hooks) == 0 for m in model.modules() if m is not q)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert outside  # the external hook did run


def test_hooks_removed_on_error():
    model = make_tiny_model("llama")
    bad = tiny_batches()
    bad[1] = {"input_ids": bad[1]["input_ids"]}  # no labels -> KeyError mid-way
    with pytest.raises(KeyError):
        estimate_fisher(model, bad, FisherConfig(show_progress=False))
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_same_factor_before_and_after_get_peft_model():
    model = make_tiny_model("llama")
    before = estimate_fisher(model, tiny_batches(), EMPIRICAL)
    peft_model = tiny_peft("llama")  # same seed -> same base weights; B = 0 so outputs are identical
    after = estimate_fisher(peft_model, tiny_batches(), EMPIRICAL)
    assert set(after.factors) == set(before.factors)
    for name in before.factors:
        torch.testing.assert_close(after.factors[name], before.factors[name], rtol=1e-4, atol=1e-5)
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert all(p.requires_grad and p.grad is None for p in lora_params)


def test_gpt2_conv1d_factor_shapes():
    model = make_tiny_model("gpt2")
    state = estimate_fisher(model, tiny_batches(), FisherConfig(show_progress=False))
    assert state.factors["transformer.h.0.attn.c_attn"].shape == (96, 96)  # Conv1D: d_out = 3 * hidden
    assert state.dims["transformer.h.0.mlp.c_fc"] == (64, 32)


def test_sampled_labels_are_seeded_and_psd():
    model = make_tiny_model("llama")
    a = estimate_fisher(model, tiny_batches(), FisherConfig(show_progress=False, label_seed=1))
    b = estimate_fisher(model, tiny_batches(), FisherConfig(show_progress=False, label_seed=1))
    e = estimate_fisher(model, tiny_batches(), EMPIRICAL)
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(a.factors[name], b.factors[name])
    assert not torch.allclose(a.factors[name], e.factors[name])
    assert torch.linalg.eigvalsh(a.factors[name].double()).min() > -1e-5


def test_cache_round_trip_and_mismatch(tmp_path):
    model = make_tiny_model("llama")
    state = estimate_fisher(model, tiny_batches(), EMPIRICAL)
    state.save(tmp_path)
    assert (tmp_path / "fisher.safetensors").is_file() and (tmp_path / "fisher.json").is_file()
    loaded = FisherState.load(tmp_path, model=model, config=EMPIRICAL)
    for name in state.factors:
        torch.testing.assert_close(loaded.factors[name], state.factors[name])
    assert loaded.token_counts == state.token_counts
    other = make_tiny_model("llama", hidden_size=48)
    with pytest.raises(FisherMismatchError, match="different model"):
        FisherState.load(tmp_path, model=other)
    with pytest.raises(FisherMismatchError, match="fisher_labels"):
        FisherState.load(tmp_path, model=model, config=FisherConfig(fisher_labels="sampled"))
    with pytest.raises(FileNotFoundError, match="alignguard fisher"):
        FisherState.load(tmp_path / "nowhere")


def test_sketch_mode_matches_dense_subspace():
    from alignguard import SubspaceConfig, build_subspaces

    model = make_tiny_model("llama", hidden_size=64, intermediate_size=128)
    batches = tiny_batches(n_repeat=3, batch_size=4)
    dense = estimate_fisher(model, batches, EMPIRICAL)
    sketch = estimate_fisher(
        model,
        batches,
        FisherConfig(fisher_labels="empirical", fisher_storage="sketch", sketch_rank=48, show_progress=False),
    )
    cfg = SubspaceConfig(fixed_m=4)
    sd, ss = build_subspaces(dense, cfg), build_subspaces(sketch, cfg)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        cos = torch.linalg.svdvals(sd.subspaces[name].basis.T @ ss.subspaces[name].basis)
        assert cos.min() > 0.99
        torch.testing.assert_close(ss.subspaces[name].eigvals, sd.subspaces[name].eigvals, rtol=0.05, atol=0.0)
    assert not sketch.factors and sketch.low_rank  # no dense d x d factor was kept


# ---- bad input -------------------------------------------------------------------------------------------


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        estimate_fisher(make_tiny_model("llama"), [], FisherConfig(show_progress=False))
    with pytest.raises(ValueError, match="empty"):
        make_batches(make_tiny_tokenizer(), [])


def test_no_response_tokens_is_an_error():
    batches = tiny_batches()
    for b in batches:
        b["labels"][:] = IGNORE_INDEX
    with pytest.raises(ValueError, match="no response tokens"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate_fisher(make_tiny_model("llama"), batches, FisherConfig(show_progress=False))
    with pytest.raises(ValueError, match="example 1: empty response"):
        make_batches(make_tiny_tokenizer(), [("a", "b"), ("c", "  ")])


def test_target_modules_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        estimate_fisher(make_tiny_model("llama"), tiny_batches(), FisherConfig(fisher_modules=["qkv"]))


def test_quantised_base_layer_is_an_error():
    model = make_tiny_model("llama")
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="quantised"):
        estimate_fisher(model, tiny_batches(), FisherConfig(show_progress=False))


def test_nonfinite_gradients_are_skipped_with_a_warning():
    model = make_tiny_model("llama")
    calls = []

    def poison(_m, _i, out):
        calls.append(1)
        if len(calls) == 1:  # first batch only
            out.register_hook(lambda g: g * float("nan"))

    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(poison)
    with pytest.warns(UserWarning, match="non-finite"):
        state = estimate_fisher(model, tiny_batches(), EMPIRICAL)
    handle.remove()
    clean = estimate_fisher(model, tiny_batches(), EMPIRICAL)
    assert state.metadata["skipped_module_batches"]
    assert all(torch.isfinite(f).all() for f in state.factors.values())
    name = "model.layers.1.mlp.down_proj"
    assert state.token_counts[name] < clean.token_counts[name]


def test_prompt_tokens_are_masked_in_batches():
    tok = make_tiny_tokenizer()
    (batch,) = make_batches(tok, [PAIRS[0]], batch_size=1)
    labels = batch["labels"][0]
    n_resp = int((labels != IGNORE_INDEX).sum())
    response_ids = tok(PAIRS[0][1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert n_resp == len(response_ids)
    assert labels[-n_resp:].tolist() == response_ids


def test_make_batches_cuts_over_long_prompts_from_the_left_when_asked():
    tok = make_tiny_tokenizer()
    pairs = [("x" * 400 + " What is 2+2?", "4, of course.")]
    with pytest.raises(ValueError, match="example 0: the prompt alone"):
        make_batches(tok, pairs, max_length=128)
    (batch,) = make_batches(tok, pairs, max_length=128, min_response_tokens=32)
    assert batch["input_ids"].shape[1] <= 128
    kept = batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()
    assert tok.decode(kept).startswith("4, of course.")
