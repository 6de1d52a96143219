"""AlignGuardTrainer: only LoRA moves, terms logged once per optimizer step, saving, projection, refresh.

Run: python -m pytest -q tests/test_trainer.py
"""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from alignguard import (
    AlignGuardConfig,
    AlignGuardRegularizer,
    AlignGuardTrainer,
    FisherConfig,
    SubspaceConfig,
    alignment_fraction,
    build_subspaces,
    estimate_fisher,
)
from alignguard.data import PaddingCollator, tokenize_example
from alignguard.tiny import make_tiny_model, make_tiny_tokenizer
from tests.helpers import tiny_batches, tiny_peft, tiny_training_args

TASK = [("Classify: stocks fell sharply today.", "business"), ("Classify: the team won the cup.", "sport")] * 4


def _dataset(tok):
    # Equal-length examples so per-token loss normalisation cannot differ between batchings.
    feats = [tokenize_example(tok, p, r) for p, r in TASK]
    width = min(len(f["input_ids"]) for f in feats)
    return [{k: v[:width] for k, v in f.items()} for f in feats]


def _setup(mode="penalty", refresh_every=None, lambda_a=1.0):
    tok = make_tiny_tokenizer()
    model = tiny_peft("llama")
    state = estimate_fisher(model, tiny_batches(tok), FisherConfig(show_progress=False))
    subs = build_subspaces(state, SubspaceConfig(m_min=2, m_max=8))
    cfg = AlignGuardConfig(mode=mode, refresh_every=refresh_every, lambda_a=lambda_a)
    return tok, model, state, subs, cfg


def _trainer(tmp_path, tok, model, state, subs, cfg, alignment_data=None, **kw):
    return AlignGuardTrainer(
        model=model,
        args=tiny_training_args(tmp_path, **kw),
        train_dataset=_dataset(tok),
        data_collator=PaddingCollator(tok.pad_token_id),
        subspaces=subs,
        alignguard_config=cfg,
        fisher_state=state,
        alignment_data=alignment_data,
    )


def test_only_lora_moves_and_terms_go_from_zero_to_positive(tmp_path):
    tok, model, state, subs, cfg = _setup()
    reg = AlignGuardRegularizer(model, subs, cfg)
    assert all(float(v.detach()) == 0.0 for v in reg().values())  # B = 0 at PEFT init
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, tok, model, state, subs, cfg)
    trainer.train()
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        assert moved == ("lora_" in name), name
    terms = reg()
    for key in ("alignment", "task", "overlap", "total"):
        assert terms[key] > 0, key
    logged = [h for h in trainer.state.log_history if "reg_total" in h]
    assert len(logged) == 3 and all("task_loss" in h and "reg_alignment" in h for h in logged)


def _train_lora_weights(tmp_path, bs, ga, lambda_a):
    tok, model, state, subs, cfg = _setup(lambda_a=lambda_a)
    trainer = _trainer(
        tmp_path,
        tok,
        model,
        state,
        subs,
        cfg,
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        max_steps=2,
        optim="sgd",
        learning_rate=0.5,
    )
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_regulariser_counted_once_per_optimizer_step_under_accumulation(tmp_path):
    one = _train_lora_weights(tmp_path / "a", bs=4, ga=1, lambda_a=1e4)
    acc = _train_lora_weights(tmp_path / "b", bs=2, ga=2, lambda_a=1e4)
    off = _train_lora_weights(tmp_path / "c", bs=4, ga=1, lambda_a=0.0)
    for name in one:
        torch.testing.assert_close(acc[name], one[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(one[n], off[n], atol=1e-6) for n in one)  # the penalty did act


def test_saves_state_beside_adapter_and_adapter_reloads(tmp_path):
    tok, model, state, subs, cfg = _setup()
    trainer = _trainer(tmp_path, tok, model, state, subs, cfg)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "subspaces.safetensors",
        "subspaces.json",
        "fisher.safetensors",
        "fisher.json",
        "alignguard_config.json",
    } <= files
    reloaded = PeftModel.from_pretrained(make_tiny_model("llama"), str(tmp_path / "final"))
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = dict(reloaded.named_parameters())
    for name, p in ours.items():
        torch.testing.assert_close(theirs[name], p)


def test_project_mode_keeps_updates_out_of_the_subspace(tmp_path):
    tok, model, state, subs, cfg = _setup(mode="project")
    _trainer(tmp_path, tok, model, state, subs, cfg).train()
    assert alignment_fraction(model, subs) < 1e-5
    assert AlignGuardRegularizer(model, subs, cfg)()["alignment"] < 1e-10
    plain_tok, plain, _, _, _ = _setup()
    _trainer(
        tmp_path / "p", plain_tok, plain, state, subs, AlignGuardConfig(lambda_a=0, lambda_t=0, lambda_nc=0)
    ).train()
    assert alignment_fraction(plain, subs) > 0.05


def test_refresh_recomputes_the_subspaces(tmp_path):
    tok, model, state, subs, cfg = _setup(refresh_every=1)
    trainer = _trainer(tmp_path, tok, model, state, subs, cfg, alignment_data=tiny_batches(tok), max_steps=2)
    trainer.train()
    assert trainer.subspaces is not subs
    name = next(iter(subs.subspaces))
    new_u, old_u = trainer.subspaces.subspaces[name].basis, subs.subspaces[name].basis
    assert new_u.shape[0] == old_u.shape[0]
    assert torch.linalg.matrix_norm(new_u @ new_u.T - old_u @ old_u.T) > 1e-3  # a different subspace
    with pytest.raises(ValueError, match="alignment_data"):
        _trainer(tmp_path, tok, model, state, subs, cfg)


def test_refresh_with_kfac_term_reestimates_the_input_factors(tmp_path):
    """alignment_input='kfac' needs A_in at the new weights too: the refresh estimates it even though the
    trainer's Fisher config (the default) does not ask for it, and the K-FAC term still enters the loss."""
    tok = make_tiny_tokenizer()
    model = tiny_peft("llama")
    state = estimate_fisher(model, tiny_batches(tok), FisherConfig(show_progress=False, input_factor=True))
    subs = build_subspaces(state, SubspaceConfig(m_min=2, m_max=8, input_rank=4))
    cfg = AlignGuardConfig(refresh_every=1, alignment_input="kfac", lambda_a=10.0)
    trainer = _trainer(tmp_path, tok, model, state, subs, cfg, alignment_data=tiny_batches(tok), max_steps=2)
    trainer.train()
    assert trainer.subspaces is not subs and set(trainer.subspaces.input_factors) == set(subs.input_factors)
    assert trainer.fisher_state.input_factors  # the refreshed state has them
    logged = [h for h in trainer.state.log_history if "reg_alignment" in h]
    assert logged and logged[-1]["reg_alignment"] > 0


def test_sft_trainer_mixin(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from alignguard import AlignGuardSFTTrainer

    tok, model, state, subs, cfg = _setup()
    ds = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": r}]}
            for p, r in TASK
        ]
    )
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        learning_rate=5e-2,
        disable_tqdm=True,
    )
    trainer = AlignGuardSFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, subspaces=subs, alignguard_config=cfg
    )
    trainer.train()
    assert any("reg_total" in h for h in trainer.state.log_history)
    assert AlignGuardRegularizer(model, subs, cfg)()["alignment"] > 0


class _Toy(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.lin(x)


def test_synthetic_task_gradient_partly_in_u():
    """The task wants an update half inside U: AlignGuard keeps ||dW_A||/||dW|| far below plain LoRA's while
    the task loss still falls."""
    from alignguard.subspace import AlignmentSubspaces, Subspace

    d, m = 24, 4
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(d, m, generator=gen)).Q
    target_in = u @ torch.randn(m, d, generator=gen)
    perp = torch.eye(d) - u @ u.T
    target_out = perp @ torch.randn(d, d, generator=gen)
    target = target_in / target_in.norm() + target_out / target_out.norm()  # half the update lies in U
    subs = AlignmentSubspaces(subspaces={"lin": Subspace(u, torch.ones(m), float(d))})
    x = torch.randn(256, d, generator=gen)

    def run(lambda_a):
        torch.manual_seed(0)
        toy = _Toy(d)
        y = x @ (toy.lin.weight.detach() + target).T
        model = get_peft_model(toy, LoraConfig(r=8, lora_alpha=8, target_modules=["lin"]))
        reg = AlignGuardRegularizer(model, subs, AlignGuardConfig(lambda_a=lambda_a, lambda_t=0, lambda_nc=0))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        losses = []
        for _ in range(120):
            task = torch.nn.functional.mse_loss(model(x), y)
            loss = task + reg()["total"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(task.detach()))
        return alignment_fraction(model, subs), losses

    plain_frac, plain_losses = run(0.0)
    ag_frac, ag_losses = run(10.0)
    assert plain_frac > 0.5
    assert ag_frac < 0.1 * plain_frac
    assert ag_losses[-1] < 0.75 * ag_losses[0]  # the part of the task outside U is still learned
    assert plain_losses[-1] < ag_losses[-1]  # ... while the part inside U is given up
