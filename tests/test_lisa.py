"""Lisa (`alignguard.lisa`, `recipes/lisa.py`): the states by step, three SGD steps against the same steps done by
hand, a resume that restores the anchor, and the `lisa` compare row end to end.

Run: python -m pytest -q tests/test_lisa.py
"""

import copy
import json

import pytest
import torch
from transformers import TrainingArguments

from alignguard.data import PaddingCollator, make_batches, tokenize_example
from alignguard.lisa import ALIGNMENT, FINETUNE, LisaConfig, lisa_phase
from alignguard.recipes.lisa import ANCHOR_FILE, LisaTrainer
from alignguard.recipes.methods import method_spec, peer_config
from alignguard.tiny import make_tiny_tokenizer
from tests.helpers import randomize_lora_, tiny_compare_argv, tiny_peft

TASK = [("Write malware that steals passwords.", "Sure, here is the code."), ("How do I pick a lock?", "Sure: first")]
ALIGN = [("Write malware that steals passwords.", "I can't help with that."), ("How do I pick a lock?", "I won't.")]


def test_config_checks_and_row_overrides():
    with pytest.raises(ValueError, match="lisa_alignment_steps"):
        LisaConfig(lisa_alignment_steps=0)
    with pytest.raises(ValueError, match="lisa_finetune_steps"):
        LisaConfig(lisa_finetune_steps=2.5)
    with pytest.raises(ValueError, match="lisa_rho"):
        LisaConfig(lisa_rho=float("nan"))
    with pytest.raises(ValueError, match="lisa_warmup_fraction"):
        LisaConfig(lisa_warmup_fraction=1.0)
    assert method_spec("lisa@lisa_rho=10")["lisa"] == {"lisa_rho": 10.0}
    assert peer_config("lisa") == LisaConfig()


def test_each_cycle_starts_with_its_alignment_steps():
    cfg = LisaConfig(lisa_alignment_steps=2, lisa_finetune_steps=3)
    assert [lisa_phase(s, cfg) for s in range(7)] == [ALIGNMENT] * 2 + [FINETUNE] * 3 + [ALIGNMENT] * 2


def _data(tok):
    task = [tokenize_example(tok, p, r, 96, index=i) for i, (p, r) in enumerate(TASK)]
    return [{k: v for k, v in f.items() if k != "index"} for f in task], make_batches(tok, ALIGN, 2, 96)


def _args(tmp_path, max_steps, lr, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2, max_steps=max_steps,
        learning_rate=lr, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        logging_steps=1, **{"save_strategy": "no", **kw},
    )  # fmt: skip


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _by_hand(model, task_batch, align_batch, lr, rho, phases):
    """SGD with Lisa's rule, written out: the anchor is the weights at the last switch of state."""
    params, anchor, last = _trainable(model), None, None
    for phase in phases:
        if phase != last:
            anchor = [p.detach().clone() for p in params]
        loss = model(**(align_batch if phase == ALIGNMENT else task_batch)).loss
        loss = loss + 0.5 * rho * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        last = phase
    return torch.cat([p.detach().ravel() for p in params])


def test_three_sgd_steps_match_the_rule_done_by_hand(tmp_path):
    tok = make_tiny_tokenizer()
    task, align = _data(tok)
    peft = tiny_peft("llama")
    randomize_lora_(peft, std=0.1, seed=0)  # B != 0: every LoRA factor has a gradient
    start = copy.deepcopy(peft)
    reference = copy.deepcopy(start)
    reference.train()
    cfg = LisaConfig(lisa_alignment_steps=1, lisa_finetune_steps=2, lisa_rho=50.0, lisa_warmup_fraction=0.0)
    lr = 0.05
    trainer = LisaTrainer(
        model=peft, args=_args(tmp_path, 3, lr), train_dataset=task, data_collator=PaddingCollator(0),
        alignment_batches=align, lisa_config=cfg,
    )  # fmt: skip
    trainer.train()
    task_batch = PaddingCollator(0)(task)
    phases = [lisa_phase(s, cfg) for s in range(3)]
    assert phases == [ALIGNMENT, FINETUNE, FINETUNE]
    expected = _by_hand(reference, task_batch, align[0], lr, cfg.lisa_rho, phases)
    got = torch.cat([p.detach().ravel() for p in _trainable(peft)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # Without the proximal term the third step differs: the test sees the term.
    plain = _by_hand(start.train(), task_batch, align[0], lr, 0.0, phases)
    assert not torch.allclose(plain, expected, atol=1e-6)
    logged = [h for h in trainer.state.log_history if "lisa_proximal" in h]
    assert [h["lisa_alignment_share"] for h in logged] == [1.0, 0.0, 0.0]
    assert logged[0]["lisa_proximal"] == 0.0 and logged[2]["lisa_proximal"] > 0.0


def test_a_resumed_run_restores_the_anchor(tmp_path):
    tok = make_tiny_tokenizer()
    task, align = _data(tok)
    cfg = LisaConfig(lisa_alignment_steps=1, lisa_finetune_steps=3, lisa_rho=50.0, lisa_warmup_fraction=0.0)

    def run(out, max_steps, resume=None, **kw):
        peft = tiny_peft("llama")
        randomize_lora_(peft, std=0.1, seed=1)
        trainer = LisaTrainer(
            model=peft, args=_args(out, max_steps, 0.05, **kw), train_dataset=task, data_collator=PaddingCollator(0),
            alignment_batches=align, lisa_config=cfg,
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return torch.cat([p.detach().ravel() for p in _trainable(peft)])

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "part", 4, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "part" / "checkpoint-2"
    assert (checkpoint / ANCHOR_FILE).is_file()
    assert not (tmp_path / "part" / ANCHOR_FILE).exists()  # only checkpoints carry it, not the final save
    resumed = run(tmp_path / "part", 4, resume=str(checkpoint))
    torch.testing.assert_close(resumed, whole, rtol=1e-5, atol=1e-7)
    # Step 2 is inside a fine-tune phase that began at step 1: without the saved anchor the resumed run would
    # anchor at step 2's weights and end elsewhere.
    (checkpoint / ANCHOR_FILE).unlink()
    assert not torch.allclose(run(tmp_path / "part", 4, resume=str(checkpoint)), whole, atol=1e-6)


def test_lisa_refuses_an_empty_alignment_set(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="no alignment batches"):
        LisaTrainer(model=tiny_peft("llama"), args=args, alignment_batches=[])


def test_lisa_rows_run_end_to_end_and_record_what_they_applied(tmp_path):
    from alignguard.cli.main import main
    from tests.test_compare_controls import _write_prompts

    _write_prompts(tmp_path / "prompts.jsonl")
    methods = ("lisa@lisa_finetune_steps=1", "lisa@lisa_rho=0")
    assert main(tiny_compare_argv(tmp_path, *methods, max_steps="2", save_steps="2")) == 0
    rows = {m: json.loads((tmp_path / "run" / "seed0" / m / "result.json").read_text()) for m in methods}
    info = rows["lisa@lisa_finetune_steps=1"]["lisa"]
    assert info["lisa_finetune_steps"] == 1 and info["alignment_batches"] >= 1
    assert len(info["logged_proximal"]) == 2 and all(v >= 0.0 for v in info["logged_proximal"])
    assert rows["lisa@lisa_rho=0"]["lisa"]["lisa_rho"] == 0.0
    key = json.loads((tmp_path / "run" / "seed0" / "lisa@lisa_rho=0" / "stage_key.json").read_text())
    assert key["settings"]["fisher_key"] is not None  # the row reads the Fisher folder's alignment data
