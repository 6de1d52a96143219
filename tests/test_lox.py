"""LoX (`alignguard.lox`): the extrapolation against a float64 numpy reference on tiny models, and the `lox`
compare row end to end (trained and evaluated on the extrapolated model, controls, the missing-base error).

Run: python -m pytest -q tests/test_lox.py
"""

import json

import numpy as np
import pytest
import torch

from alignguard.cli.main import main
from alignguard.lox import LoxConfig, apply_lox_, oriented_weight
from alignguard.recipes.methods import method_spec, peer_config
from alignguard.targets import find_target_modules
from alignguard.tiny import make_tiny_model, make_tiny_tokenizer, tiny_target_modules


def aligned_pair(family="llama", delta_rank=None, zero=(), seed=1):
    """(base, aligned): the tiny model and a copy whose 2-D weights moved by a random delta (of rank `delta_rank`
    when given; none for parameter names containing one of `zero`)."""
    base, aligned = make_tiny_model(family, seed=0), make_tiny_model(family, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in aligned.named_parameters():
            if p.dim() != 2 or any(z in name for z in zero):
                continue
            if delta_rank is None:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            else:
                u, v = (
                    torch.randn(p.shape[0], delta_rank, generator=gen),
                    torch.randn(delta_rank, p.shape[1], generator=gen),
                )
                p.add_(u @ v * 0.02)
    return base, aligned


def write_aligned_folder(root, base_spec="tiny-llama"):
    """A saved aligned tiny model whose align_info.json names `base_spec` as its base (what `alignguard align`
    writes), so compare rows find the base as they do for a real aligned model."""
    _, aligned = aligned_pair("llama", delta_rank=8)
    folder = root / "aligned"
    aligned.save_pretrained(str(folder))
    make_tiny_tokenizer().save_pretrained(str(folder))
    (folder / "align_info.json").write_text(json.dumps({"base_model": base_spec}))
    return folder


def _np_truncation(delta: np.ndarray, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("rank, alpha", [(2, 1.25), (6, 0.5), (0, 1.25)])
def test_added_part_is_alpha_times_the_rank_k_svd_truncation(family, rank, alpha):
    base, aligned = aligned_pair(family)
    targets = tiny_target_modules(family)
    before = {n: oriented_weight(m).numpy() for n, m in find_target_modules(aligned, targets).items()}
    deltas = {n: before[n] - oriented_weight(m).numpy() for n, m in find_target_modules(base, targets).items()}
    info = apply_lox_(aligned, base, LoxConfig(lox_rank=rank, lox_alpha=alpha), targets, dtype=torch.float64)
    assert info["layers"] == sorted(before) and info["lox_rank"] == rank and info["lox_alpha"] == alpha
    for name, module in find_target_modules(aligned, targets).items():
        added = oriented_weight(module).numpy() - before[name]
        delta = deltas[name]
        k = rank or min(delta.shape)
        np.testing.assert_allclose(added, alpha * _np_truncation(delta, k), atol=1e-6, rtol=0)
        s = np.linalg.svd(added, compute_uv=False)
        assert s[k:].max(initial=0.0) < 1e-7 * s[0]  # rank <= k (float32 storage: ~1e-7 relative)
        kept = float((s[:k] ** 2).sum() / alpha**2 / (delta**2).sum())
        assert info["energy_kept"][name] == pytest.approx(kept, rel=1e-4) and 0 < kept <= 1 + 1e-6


def test_float32_default_matches_float64_and_other_weights_are_untouched():
    base, aligned = aligned_pair("llama")
    _, aligned64 = aligned_pair("llama")
    untouched = {n: p.clone() for n, p in aligned.named_parameters() if "q_proj" not in n}
    apply_lox_(aligned, base, LoxConfig(), ["q_proj"])  # only q_proj: every other weight stays
    apply_lox_(aligned64, base, LoxConfig(), ["q_proj"], dtype=torch.float64)
    for name, p in aligned.named_parameters():
        if name in untouched:
            assert torch.equal(p, untouched[name]), name
        else:
            torch.testing.assert_close(p, dict(aligned64.named_parameters())[name], rtol=1e-5, atol=1e-6)


def test_zero_delta_layers_are_reported_and_alpha_zero_is_a_no_op():
    base, aligned = aligned_pair("llama", zero=("v_proj",))
    targets = tiny_target_modules("llama")
    snapshot = {n: p.clone() for n, p in aligned.named_parameters()}
    info = apply_lox_(aligned, base, LoxConfig(lox_alpha=0.0), targets)
    assert all(torch.equal(p, snapshot[n]) for n, p in aligned.named_parameters())
    assert info["zero_delta_layers"] == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    assert not set(info["zero_delta_layers"]) & set(info["layers"]) and info["added_norm"] == 0.0


def test_config_and_method_overrides_are_validated():
    with pytest.raises(ValueError, match="lox_rank: must be >= 0"):
        LoxConfig(lox_rank=-1)
    with pytest.raises(ValueError, match="lox_alpha: must be >= 0"):
        LoxConfig(lox_alpha=float("nan"))
    assert method_spec("lox@lox_rank=4,lox_alpha=1.0,poison_ratio=0")["lox"] == {"lox_rank": 4, "lox_alpha": 1.0}
    assert peer_config("lox@lox_rank=4") == LoxConfig(lox_rank=4)
    with pytest.raises(ValueError, match=r"'lox@lox_alpha=-2': lox_alpha: must be >= 0"):
        method_spec("lox@lox_alpha=-2")
    with pytest.raises(ValueError, match=r"a field of AlignGuardConfig or of LoxConfig or one of poison_ratio"):
        method_spec("lox@asft_lambda=3")
    with pytest.raises(ValueError, match=r"a field of AlignGuardConfig or one of poison_ratio"):
        method_spec("plain_lora@lox_rank=3")  # only a LoX row takes LoX options


# --------------------------------------------------------------------------- compare rows, end to end


def _compare_argv(root, model, *methods):
    from tests.test_compare_controls import _argv, _write_prompts

    _write_prompts(root / "prompts.jsonl")
    argv = _argv(root, *methods, model=str(model), max_steps="2", save_steps="2")
    return argv


def test_lox_rows_train_and_evaluate_on_the_extrapolated_model(tmp_path, monkeypatch):
    from alignguard.recipes import compare

    folder = write_aligned_folder(tmp_path)
    seen, with_adapter = {}, {}
    original = compare._driftcheck

    def spy(model, tokenizer, cfg, out_dir, baseline, task):  # the q_proj weight each row is evaluated with
        q = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        seen[out_dir.parent.name] = (q.get_base_layer() if hasattr(q, "get_base_layer") else q).weight.clone()
        with_adapter[out_dir.parent.name] = hasattr(model, "peft_config")
        return original(model, tokenizer, cfg, out_dir, baseline, task)

    monkeypatch.setattr(compare, "_driftcheck", spy)
    methods = ("lox", "lox@poison_ratio=0,lox_rank=2")
    assert main(_compare_argv(tmp_path, folder, *methods)) == 0
    base, aligned = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=0)
    aligned.load_state_dict(type(aligned).from_pretrained(str(folder)).state_dict())
    for name, rank in (("lox", 6), ("lox@poison_ratio=0,lox_rank=2", 2)):
        result = json.loads((tmp_path / "run" / "seed0" / name / "result.json").read_text())
        info = result["lox"]
        assert info["lox_rank"] == rank and info["lox_alpha"] == 1.25
        assert len(info["layers"]) == 8 and all(
            n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for n in info["layers"]
        )
        q_al = aligned.model.layers[0].self_attn.q_proj.weight.detach().double()
        delta = q_al - base.model.layers[0].self_attn.q_proj.weight.detach().double()
        expected = q_al + 1.25 * torch.from_numpy(_np_truncation(delta.numpy(), rank))
        torch.testing.assert_close(seen[name].double(), expected, rtol=1e-5, atol=1e-6)
    assert (
        json.loads((tmp_path / "run" / "seed0" / "lox@poison_ratio=0,lox_rank=2" / "result.json").read_text())[
            "poison_ratio"
        ]
        == 0.0
    )
    assert not torch.equal(seen["lox"], seen["base"])  # the aligned model itself was evaluated unextrapolated
    assert with_adapter == {"base": False, "lox": True, "lox@poison_ratio=0,lox_rank=2": True}


def test_peer_rows_without_a_base_model_fail_before_training_naming_the_flag(tmp_path):
    argv = _compare_argv(tmp_path, "tiny-llama", "lox")
    with pytest.raises(SystemExit, match=r"tiny-llama has no align_info.json; pass --base_model for lox"):
        main(argv)
    assert not (tmp_path / "run" / "seed0" / "lox" / "train_summary.json").exists()
