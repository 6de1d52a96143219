"""AlignGuardTrainer wiring: refresh configs, logged task loss under accumulation, DataParallel losses, NaN stops.

Run: python -m pytest -q tests/test_trainer_wiring.py
"""

import math

import pytest
import torch
from transformers import Trainer

from alignguard import (
    AlignGuardConfig,
    AlignGuardTrainer,
    FisherConfig,
    SubspaceConfig,
    build_subspaces,
    estimate_fisher,
)
from alignguard.data import PaddingCollator, tokenize_example
from alignguard.subspace import Subspace
from alignguard.tiny import make_tiny_tokenizer
from alignguard.trainer import NonFiniteLossError
from tests.helpers import tiny_batches, tiny_peft, tiny_training_args

TASK = [("Classify: stocks fell sharply today.", "business"), ("Classify: the team won the cup.", "sport")] * 4
QV = ["q_proj", "v_proj"]


def _dataset(tok):
    feats = [tokenize_example(tok, p, r) for p, r in TASK]
    width = min(len(f["input_ids"]) for f in feats)
    return [{k: v[:width] for k, v in f.items()} for f in feats]


def _trainer(tmp_path, model, subs, cfg, state=None, alignment_data=None, trainer_kwargs=None, **args):
    tok = make_tiny_tokenizer()
    return AlignGuardTrainer(
        model=model,
        args=tiny_training_args(tmp_path, **{"max_steps": 2, **args}),
        train_dataset=_dataset(tok),
        data_collator=PaddingCollator(tok.pad_token_id),
        subspaces=subs,
        alignguard_config=cfg,
        fisher_state=state,
        alignment_data=alignment_data,
        **(trainer_kwargs or {}),
    )


def _estimated(fisher_config, subspace_config):
    model = tiny_peft("llama")
    state = estimate_fisher(model, tiny_batches(make_tiny_tokenizer()), fisher_config)
    return model, state, build_subspaces(state, subspace_config)


# ---- refresh -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["dense", "sketch"])
def test_refresh_reproduces_estimate_fisher_with_the_states_own_config(tmp_path, storage):
    """Fisher on q,v with a non-default seed and storage: after one step the refresh equals estimate_fisher +
    build_subspaces with the original configs at the same weights, module for module and bit for bit."""
    fisher_cfg = FisherConfig(
        fisher_modules=QV, fisher_storage=storage, sketch_rank=8, label_seed=3, show_progress=False
    )
    sub_cfg = SubspaceConfig(m_min=2, m_max=5, energy=0.6, eigen_solver="exact")
    model, state, subs = _estimated(fisher_cfg, sub_cfg)
    cfg = AlignGuardConfig(refresh_every=1, allow_unprotected=True, lambda_a=100.0)
    with pytest.warns(UserWarning, match="10 of 14 LoRA layers"):
        trainer = _trainer(tmp_path, model, subs, cfg, state, alignment_data=tiny_batches(), max_steps=1)
    assert trainer.fisher_config == fisher_cfg and trainer.subspace_config == sub_cfg
    trainer.train()  # refreshes after the one step, at the final weights
    ref = estimate_fisher(model, tiny_batches(), fisher_cfg)
    got = trainer.fisher_state
    assert got.module_names == ref.module_names == state.module_names and len(got.module_names) == 4
    assert got.metadata["config"] == state.metadata["config"]
    want_tensors = ref.factors if storage == "dense" else {n: v for n, (_, v) in ref.low_rank.items()}
    got_tensors = got.factors if storage == "dense" else {n: v for n, (_, v) in got.low_rank.items()}
    old_tensors = state.factors if storage == "dense" else {n: v for n, (_, v) in state.low_rank.items()}
    for name, want in want_tensors.items():
        assert torch.equal(got_tensors[name], want), name
    assert any(not torch.allclose(old_tensors[n], want_tensors[n]) for n in want_tensors)  # the weights did move
    ref_subs = build_subspaces(ref, sub_cfg)
    for name, sub in ref_subs.subspaces.items():
        assert torch.equal(trainer.subspaces.subspaces[name].basis, sub.basis), name
        assert torch.equal(trainer.subspaces.subspaces[name].eigvals, sub.eigvals), name
    assert trainer.regularizer.n_modules == 4 and len(trainer.regularizer.unprotected) == 10


def test_refresh_maps_configs_saved_under_their_old_field_names(tmp_path):
    model, state, subs = _estimated(FisherConfig(show_progress=False), SubspaceConfig(m_min=2, m_max=4))
    state.metadata["config"] = {
        "mode": "dense",
        "seed": 5,
        "target_modules": QV,
        "fisher_labels": "empirical",
        "sketch_rank": 16,
    }
    subs.metadata["config"] = {"method": "exact", "seed": 2, "m_min": 2, "m_max": 4}
    cfg = AlignGuardConfig(refresh_every=5)
    trainer = _trainer(tmp_path, model, subs, cfg, state, alignment_data=tiny_batches())
    assert trainer.fisher_config == FisherConfig(
        fisher_storage="dense",
        label_seed=5,
        fisher_modules=QV,
        fisher_labels="empirical",
        sketch_rank=16,
        show_progress=False,
    )
    assert trainer.subspace_config == SubspaceConfig(eigen_solver="exact", solver_seed=2, m_min=2, m_max=4)
    state.metadata["config"] = {"fisher_storage": "dense", "damping": 0.1}
    with pytest.raises(
        ValueError, match=r"fisher_state.metadata\[\"config\"\]: unknown FisherConfig fields \['damping'\]"
    ):
        _trainer(tmp_path, model, subs, cfg, state, alignment_data=tiny_batches())


def test_refresh_needs_alignment_data_and_the_fisher_state_or_explicit_configs(tmp_path):
    model, state, subs = _estimated(FisherConfig(show_progress=False), SubspaceConfig(m_min=2, m_max=4))
    cfg = AlignGuardConfig(refresh_every=2)
    with pytest.raises(ValueError, match="needs alignment_data="):
        _trainer(tmp_path, model, subs, cfg, state)
    with pytest.raises(ValueError, match="needs fisher_state="):
        _trainer(tmp_path, model, subs, cfg, None, alignment_data=tiny_batches())
    explicit = FisherConfig(fisher_modules=["q_proj"], show_progress=False)
    trainer = _trainer(
        tmp_path, model, subs, cfg, None, alignment_data=tiny_batches(), trainer_kwargs={"fisher_config": explicit}
    )
    assert trainer.fisher_config is explicit  # explicit settings win over the saved ones


# ---- logged task loss ------------------------------------------------------------------------------------------


def _logged(tmp_path, ga, scaled):
    model = tiny_peft("llama")
    _, state, subs = _estimated(FisherConfig(show_progress=False), SubspaceConfig(m_min=2, m_max=8))
    trainer = _trainer(
        tmp_path,
        model,
        subs,
        AlignGuardConfig(lambda_a=1e3),
        per_device_train_batch_size=4 // ga,
        gradient_accumulation_steps=ga,
    )
    if not scaled:  # the Trainer's other path: per-micro-batch means, divided by GA in training_step
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("scaled", [True, False], ids=["num_items_in_batch", "mean_per_batch"])
def test_logged_task_loss_is_the_optimizer_steps_task_loss(tmp_path, scaled):
    """task_loss + reg_total == the Trainer's own `loss` at GA=1 and GA=2, and GA=2 logs the whole step's task loss
    (not the last micro-batch's share of it): the first step (B = 0, same examples) logs the same value."""
    runs = {ga: _logged(tmp_path / str(ga), ga, scaled) for ga in (1, 2)}
    for ga, logs in runs.items():
        assert len(logs) == 2
        for h in logs:
            assert math.isclose(h["task_loss"] + h["reg_total"], h["loss"], rel_tol=1e-6), (ga, h)
        assert logs[1]["reg_total"] > 0.01 * logs[1]["loss"]  # the subtraction is informative
    # Per-micro-batch means weigh tokens slightly differently when examples have different response lengths; the
    # last micro-batch's share alone would be about half.
    tol = 1e-5 if scaled else 1e-2
    assert math.isclose(runs[2][0]["task_loss"], runs[1][0]["task_loss"], rel_tol=tol)
    assert math.isclose(runs[2][1]["task_loss"], runs[1][1]["task_loss"], rel_tol=max(tol, 1e-3))


def test_vector_loss_from_data_parallel_is_reduced_before_the_regulariser_and_logging(tmp_path, monkeypatch):
    """Under torch DataParallel (n_gpu > 1) the model returns one loss per GPU; reduce it like the Trainer does."""
    model = tiny_peft("llama")
    _, state, subs = _estimated(FisherConfig(show_progress=False), SubspaceConfig(m_min=2, m_max=8))
    trainer = _trainer(tmp_path, model, subs, AlignGuardConfig())
    monkeypatch.setattr(Trainer, "compute_loss", lambda *a, **k: torch.tensor([1.0, 3.0], requires_grad=True))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, {})
    assert loss.shape == () and float(loss) == pytest.approx(2.0)  # B = 0: the regulariser adds 0
    trainer.log({"loss": float(loss)})
    assert trainer.state.log_history[-1]["task_loss"] == pytest.approx(2.0)
    assert trainer.state.log_history[-1]["reg_total"] == 0.0


# ---- non-finite values stop training ---------------------------------------------------------------------------


def test_nan_eigenvalue_stops_training_naming_term_and_module(tmp_path):
    model = tiny_peft("llama")
    _, state, subs = _estimated(FisherConfig(show_progress=False), SubspaceConfig(m_min=2, m_max=8))
    name = sorted(subs.subspaces)[0]
    bad = subs.subspaces[name]
    subs.subspaces[name] = Subspace(bad.basis, torch.full_like(bad.eigvals, float("nan")), bad.trace)
    with pytest.raises(ValueError, match=rf"NaN/inf.*{name}"):  # a corrupt factor is refused up front
        _trainer(tmp_path, model, subs, AlignGuardConfig())
    subs.subspaces[name] = bad
    trainer = _trainer(tmp_path, model, subs, AlignGuardConfig())
    group = next(g for g in trainer.regularizer.groups if name in g.names)
    group.eigvals[group.names.index(name), 0] = float("nan")  # corrupted after the checks (e.g. in memory)
    with pytest.raises(
        NonFiniteLossError, match=rf"not finite at optimizer step 1: term\(s\) \['alignment'.*alignment in {name}"
    ):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # stopped before the optimizer step


def test_nan_task_loss_stops_training(tmp_path):
    model = tiny_peft("llama")
    _, state, subs = _estimated(FisherConfig(show_progress=False), SubspaceConfig(m_min=2, m_max=8))
    trainer = _trainer(tmp_path, model, subs, AlignGuardConfig())
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="the task loss is nan at optimizer step 1"):
        trainer.train()
