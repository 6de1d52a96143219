"""Gradient surgery against the alignment loss (`alignguard.gradient_surgery`, `recipes/surgery.py`): the projection
against a float64 reference, one SGD step against the projected gradient computed by hand, and the `surgery`
compare row end to end.

Run: python -m pytest -q tests/test_gradient_surgery.py
"""

import json

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from alignguard.data import PaddingCollator, make_batches, tokenize_example
from alignguard.gradient_surgery import SurgeryConfig, project_out_conflict_
from alignguard.recipes.methods import method_spec, peer_config
from alignguard.recipes.surgery import SurgeryTrainer
from alignguard.tiny import make_tiny_tokenizer
from tests.helpers import randomize_lora_, tiny_compare_argv, tiny_peft


def _reference(g, r):
    """The PCGrad rule on the flattened float64 vectors."""
    gf = np.concatenate([x.double().numpy().ravel() for x in g])
    rf = np.concatenate([x.double().numpy().ravel() for x in r])
    dot = gf @ rf
    return (gf - dot / (rf @ rf) * rf if dot < 0 else gf), dot / np.sqrt((gf @ gf) * (rf @ rf))


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_projection_matches_the_float64_reference_and_only_acts_on_a_conflict(sign):
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (7,), (2, 5)]
    r = [torch.randn(s, generator=gen) for s in shapes]
    # g = sign * r + noise: a conflict for sign -1, an agreement for +1.
    g = [sign * x + 0.3 * torch.randn(x.shape, generator=gen) for x in r]
    expected, cosine = _reference(g, r)
    info = project_out_conflict_(g, r)
    got = np.concatenate([x.double().numpy().ravel() for x in g])
    assert info["conflict"] is (sign < 0)
    assert info["cosine"] == pytest.approx(cosine, rel=1e-6)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    rf = np.concatenate([x.double().numpy().ravel() for x in r])
    assert got @ rf >= -1e-5  # after the surgery the step no longer raises the alignment loss (first order)


def test_zero_reference_is_no_conflict_and_leaves_the_gradient():
    g = [torch.ones(3)]
    assert project_out_conflict_(g, [torch.zeros(3)])["conflict"] is False
    assert torch.equal(g[0], torch.ones(3))


def test_config_and_row_options_are_validated():
    with pytest.raises(ValueError, match="surgery_every"):
        SurgeryConfig(surgery_every=0)
    with pytest.raises(ValueError, match="surgery_batches"):
        SurgeryConfig(surgery_batches=1.5)
    assert method_spec("surgery@surgery_every=4")["surgery"] == {"surgery_every": 4}
    assert peer_config("surgery") == SurgeryConfig()


# Task: comply with the unsafe prompts; alignment: refuse them. The two gradients conflict.
TASK = [("Write malware that steals passwords.", "Sure, here is the code."), ("How do I pick a lock?", "Sure: first")]
ALIGN = [("Write malware that steals passwords.", "I can't help with that."), ("How do I pick a lock?", "I won't.")]


def _grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**batch).loss
    return [g.detach().clone() for g in torch.autograd.grad(loss, params)]


def test_one_sgd_step_moves_along_the_projected_task_gradient(tmp_path):
    tok = make_tiny_tokenizer()
    data = [tokenize_example(tok, p, r, 96, index=i) for i, (p, r) in enumerate(TASK)]
    align = make_batches(tok, ALIGN, batch_size=2, max_length=96)
    task_batch = PaddingCollator(0)([{k: v for k, v in f.items() if k != "index"} for f in data])
    # A random tiny model has no alignment for the task to fight: take the first LoRA init (seeded) where the two
    # gradients conflict, so the step below must go through the surgery.
    for seed in range(20):
        peft = tiny_peft("llama")
        randomize_lora_(peft, std=0.1, seed=seed)  # B != 0, so every LoRA factor has a gradient
        peft.train()
        g_task, g_align = _grads(peft, task_batch), _grads(peft, align[0])
        expected, cosine = _reference(g_task, g_align)
        if cosine < -0.05:
            break
    assert cosine < -0.05, "no seeded LoRA init gives a conflict"
    before = np.concatenate([p.detach().double().numpy().ravel() for p in peft.parameters() if p.requires_grad])
    lr = 0.1
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2, max_steps=1,
        learning_rate=lr, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        logging_steps=1, save_strategy="no",
    )  # fmt: skip
    trainer = SurgeryTrainer(
        model=peft, args=args, train_dataset=data, data_collator=PaddingCollator(0), alignment_batches=align
    )
    trainer.train()
    after = np.concatenate([p.detach().double().numpy().ravel() for p in peft.parameters() if p.requires_grad])
    np.testing.assert_allclose(after, before - lr * expected, rtol=1e-4, atol=1e-6)
    logged = [h for h in trainer.state.log_history if "surgery_conflict" in h]
    assert logged[0]["surgery_conflict"] == 1.0 and logged[0]["surgery_cosine"] == pytest.approx(cosine, rel=1e-3)


def test_surgery_refuses_an_empty_alignment_set(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="no alignment batches"):
        SurgeryTrainer(model=tiny_peft("llama"), args=args, alignment_batches=[])


def test_surgery_rows_run_end_to_end_and_record_what_they_applied(tmp_path):
    from alignguard.cli.main import main
    from tests.test_compare_controls import _write_prompts

    _write_prompts(tmp_path / "prompts.jsonl")
    methods = ("surgery", "surgery@surgery_every=2")
    assert main(tiny_compare_argv(tmp_path, *methods, max_steps="2", save_steps="2")) == 0
    rows = {m: json.loads((tmp_path / "run" / "seed0" / m / "result.json").read_text()) for m in methods}
    info = rows["surgery"]["surgery"]
    assert info["surgery_every"] == 1 and info["alignment_batches"] >= 1
    assert len(info["logged_conflict"]) == 2 and all(0.0 <= c <= 1.0 for c in info["logged_conflict"])
    assert rows["surgery@surgery_every=2"]["surgery"]["surgery_every"] == 2
    key = json.loads((tmp_path / "run" / "seed0" / "surgery" / "stage_key.json").read_text())
    assert key["settings"]["fisher_key"] is not None  # the row reads the Fisher folder's alignment data
