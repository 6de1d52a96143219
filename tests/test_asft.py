"""AsFT (`alignguard.asft`, `alignguard.recipes.asft`): the factored penalty against a slow float64 dense reference
(value and gradients), its factors, the trainer's loss term, and the `asft` compare row end to end.

Run: python -m pytest -q tests/test_asft.py
"""

import json

import pytest
import torch
from transformers import TrainingArguments

from alignguard.asft import AsftConfig, AsftPenalty, build_asft_factors
from alignguard.lox import oriented_weight
from alignguard.recipes.asft import AsftTrainer
from alignguard.recipes.methods import method_spec, peer_config
from alignguard.targets import find_target_modules, lora_modules
from tests.helpers import randomize_lora_, tiny_batches
from tests.test_lox import _compare_argv, aligned_pair, write_aligned_folder


def _peft_on(aligned, family, randomize=True):
    """A LoRA model on a copy of `aligned` (r=4, alpha=8), with random A and B unless `randomize=False`."""
    import copy

    from peft import LoraConfig, get_peft_model

    from alignguard.tiny import tiny_target_modules

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=tiny_target_modules(family), fan_in_fan_out=family == "gpt2")
    peft = get_peft_model(copy.deepcopy(aligned), cfg)
    if randomize:
        randomize_lora_(peft, std=0.3)
    return peft


def dense_reference(peft, aligned, base) -> dict:
    """Σ_layers ‖(I - C) ΔW‖_F², C = V Vᵀ / ‖V‖_F, in float64 with d_out x d_in products, ΔW from PEFT's own
    get_delta_weight (its scaling and fan_in_fan_out orientation), differentiable in lora_A / lora_B."""
    from transformers.pytorch_utils import Conv1D

    al, ba = find_target_modules(aligned), find_target_modules(base)
    out = {}
    for name, (layer, adapter) in lora_modules(peft).items():
        v = oriented_weight(al[name]) - oriented_weight(ba[name])
        norm = torch.linalg.matrix_norm(v)
        c = v @ v.T / norm if norm > 0 else torch.zeros(v.shape[0], v.shape[0], dtype=torch.float64)
        b, a = layer.lora_B[adapter].weight.double(), layer.lora_A[adapter].weight.double()
        dw = layer.scaling[adapter] * (b @ a)
        # PEFT's delta, oriented d_out x d_in, must be the same product: checks the orientation convention.
        peft_dw = layer.get_delta_weight(adapter).detach().double()
        peft_dw = peft_dw.T if isinstance(layer.get_base_layer(), Conv1D) else peft_dw
        torch.testing.assert_close(dw.detach(), peft_dw, rtol=1e-5, atol=1e-6)
        out[name] = ((torch.eye(v.shape[0], dtype=torch.float64) - c) @ dw).square().sum()
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("delta_rank", [None, 2])
def test_penalty_and_its_gradients_match_the_dense_float64_reference(family, delta_rank):
    base, aligned = aligned_pair(family, delta_rank=delta_rank, zero=("k_proj", "c_fc"))
    peft = _peft_on(aligned, family)
    penalty = AsftPenalty(peft, build_asft_factors(aligned, base))
    fast, slow = penalty.per_layer(), dense_reference(peft, aligned, base)
    assert sorted(fast) == sorted(slow) == penalty.layer_names
    for name in slow:
        assert fast[name].item() == pytest.approx(slow[name].item(), rel=2e-5), name
    params = [p for n, p in peft.named_parameters() if "lora_" in n]
    got = torch.autograd.grad(penalty(), params)
    want = torch.autograd.grad(torch.stack(list(slow.values())).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)


def test_factors_reproduce_c_and_have_the_rank_of_the_delta():
    base, aligned = aligned_pair("llama", delta_rank=2, zero=("v_proj",))
    factors = build_asft_factors(aligned, base, dtype=torch.float64)
    al, ba = find_target_modules(aligned), find_target_modules(base)
    for name, f in factors.items():
        v = oriented_weight(al[name]) - oriented_weight(ba[name])
        if name.endswith("v_proj"):  # V = 0: C = 0 (its limit), the whole update is penalised
            assert f.shape == (v.shape[0], 0)
            continue
        assert f.shape == (v.shape[0], 2), name  # both Gram branches (wide q_proj, tall gate_proj/up_proj)
        torch.testing.assert_close(f @ f.T, v @ v.T / torch.linalg.matrix_norm(v), rtol=1e-9, atol=1e-12)


def test_penalty_is_zero_at_lora_init_and_the_full_update_where_v_is_zero():
    base, aligned = aligned_pair("llama", zero=("v_proj",))
    peft = _peft_on(aligned, "llama", randomize=False)  # standard init: B = 0
    penalty = AsftPenalty(peft, build_asft_factors(aligned, base))
    assert penalty().item() == 0.0
    randomize_lora_(peft)
    for name, value in penalty.per_layer().items():
        if name.endswith("v_proj"):
            layer, ad = lora_modules(peft)[name]
            update = layer.scaling[ad] * (layer.lora_B[ad].weight @ layer.lora_A[ad].weight)
            assert float(value) == pytest.approx(float(update.square().sum()), rel=1e-5)
    with pytest.raises(ValueError, match="has no factor C"):
        AsftPenalty(peft, build_asft_factors(aligned, base, ["q_proj"]))


def _trainer(peft, factors, lam, tmp_path, data=None, **args):
    from alignguard.data import PaddingCollator

    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2, **args
    )
    return AsftTrainer(
        model=peft,
        args=args,
        train_dataset=data,
        data_collator=PaddingCollator(0),
        asft_factors=factors,
        asft_config=AsftConfig(asft_lambda=lam),
    )


def test_trainer_loss_is_task_loss_plus_lambda_times_penalty(tmp_path):
    from transformers import Trainer

    base, aligned = aligned_pair("llama")
    peft = _peft_on(aligned, "llama")
    trainer = _trainer(peft, build_asft_factors(aligned, base), 0.5, tmp_path)
    batch = tiny_batches()[0]
    peft.train()
    task = Trainer.compute_loss(trainer, peft, batch)
    total = trainer.compute_loss(peft, batch)
    penalty = trainer.asft_penalty()
    assert float(penalty) > 0
    assert float(total) == pytest.approx(float(task + 0.5 * penalty), rel=1e-6)
    peft.eval()  # evaluation losses stay the task loss
    assert float(trainer.compute_loss(peft, batch)) == pytest.approx(float(Trainer.compute_loss(trainer, peft, batch)))


def test_a_large_lambda_keeps_the_update_out_of_the_penalised_directions(tmp_path):
    from alignguard.data import tokenize_example
    from alignguard.tiny import make_tiny_tokenizer
    from tests.helpers import PAIRS

    base, aligned = aligned_pair("llama", delta_rank=2)
    data = [tokenize_example(make_tiny_tokenizer(), p, r, 96, index=i) for i, (p, r) in enumerate(PAIRS * 2)]
    logged = {}
    for lam in (0.0, 100.0):
        torch.manual_seed(0)  # the same LoRA init for both lambdas
        peft = _peft_on(aligned, "llama", randomize=False)
        factors = build_asft_factors(aligned, base)
        trainer = _trainer(
            peft, factors, lam, tmp_path / str(lam), data, max_steps=4, learning_rate=1e-2, logging_steps=1
        )
        trainer.train()
        logged[lam] = [h["asft_penalty"] for h in trainer.state.log_history if "asft_penalty" in h]
        logged[f"final{lam}"] = float(trainer.asft_penalty())
    assert len(logged[0.0]) == 4 and logged[0.0][0] == 0.0  # B = 0 before the first step
    assert logged["final100.0"] < 0.5 * logged["final0.0"], logged


def test_config_and_method_overrides_are_validated():
    with pytest.raises(ValueError, match="asft_lambda: must be >= 0"):
        AsftConfig(asft_lambda=-1.0)
    assert method_spec("asft@asft_lambda=10")["asft"] == {"asft_lambda": 10.0}
    assert peer_config("asft") == AsftConfig() and peer_config("plain_lora") is None
    with pytest.raises(
        ValueError, match=r"AlignGuardConfig or of AsftConfig or one of poison_ratio, got 'lox_rank=2'"
    ):
        method_spec("asft@lox_rank=2")


def test_asft_rows_run_end_to_end_and_record_what_they_applied(tmp_path):
    folder = write_aligned_folder(tmp_path)
    from alignguard.cli.main import main

    methods = ("asft", "asft@poison_ratio=0,asft_lambda=0")
    assert main(_compare_argv(tmp_path, folder, *methods)) == 0
    rows = {m: json.loads((tmp_path / "run" / "seed0" / m / "result.json").read_text()) for m in methods}
    info = rows["asft"]["asft"]
    assert info["asft_lambda"] == 1.0 and len(info["layers"]) == 8 and info["zero_delta_layers"] == []
    assert set(info["c_rank"].values()) == {8}  # the folder's delta has rank 8 in every layer
    assert info["logged_penalty"][0] == 0.0 and info["logged_penalty"][-1] > 0  # B = 0 at step 1, then trained
    assert rows["asft@poison_ratio=0,asft_lambda=0"]["asft"]["asft_lambda"] == 0.0
    assert rows["asft@poison_ratio=0,asft_lambda=0"]["poison_ratio"] == 0.0
    settings = json.loads((tmp_path / "run" / "seed0" / "asft" / "train_settings.json").read_text())["settings"]
    assert settings["method_settings"] == {"asft": {"asft_lambda": 1.0}}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["rows"]) == set(methods)
