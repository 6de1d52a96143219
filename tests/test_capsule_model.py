"""R-Capsule wrapper: shapes and masks, the reconstruction pass sees only the capsule, losses fall, KV-cache decoding.

Run: python -m pytest -q tests/test_capsule_model.py
"""

import pytest
import torch

from alignguard.capsule.config import CapsuleModelConfig, CapsuleTrainConfig
from alignguard.capsule.data import CapsuleExample, collate, generate_problems
from alignguard.capsule.model import build_capsule_model
from alignguard.capsule.train import train_capsule

K = 2


def _model(family="llama", **kw):
    cfg = CapsuleModelConfig(
        model=f"tiny-{family}", tiny_hidden_size=32, num_capsule_tokens=K, bottleneck_rank=8, **kw
    )
    model, tok = build_capsule_model(cfg, seed=0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def llama():
    return _model("llama")


@pytest.fixture(scope="module")
def examples():
    return generate_problems(4, 2, 3, seed=0, num_distractors=0)


def test_capsule_shapes_and_padding_invariance(llama, examples):
    model, tok = llama
    batch = collate(tok, examples, "capsule", 256)
    capsule, cache = model.build_capsule(batch.prompt_ids, batch.prompt_mask)
    assert capsule.shape == (len(examples), K, model.capsule_queries.shape[1]) and cache is None
    # Each row alone (no padding) must give the same capsule and loss as inside the left-padded batch: padded
    # positions are masked and positions count real tokens only.
    for i, ex in enumerate(examples):
        single = collate(tok, [ex], "capsule", 256)
        alone, _ = model.build_capsule(single.prompt_ids, single.prompt_mask)
        torch.testing.assert_close(alone[0], capsule[i], atol=1e-5, rtol=1e-4)
    # The cache path builds the same capsule and keeps exactly the question's cache (queries cropped off).
    cached, cache = model.build_capsule(batch.prompt_ids, batch.prompt_mask, use_cache=True)
    torch.testing.assert_close(cached, capsule, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == batch.prompt_ids.shape[1]


def test_task_loss_ignores_padding(llama, examples):
    model, tok = llama
    batch = collate(tok, examples[:2], "capsule", 256)
    capsule, _ = model.build_capsule(batch.prompt_ids, batch.prompt_mask)
    # Change the pad token ids: masked positions must not matter.
    other = collate(tok, examples[:2], "capsule", 256)
    other.prompt_ids = other.prompt_ids.masked_fill(other.prompt_mask == 0, 65)
    other.target_ids = other.target_ids.masked_fill(other.target_mask == 0, 66)
    torch.testing.assert_close(model.task_loss(batch, capsule), model.task_loss(other, capsule))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_losses_from_kept_logits_equal_full_logits(family, examples):
    # The loss passes ask the LM for logits of the target segment only (logits_to_keep); they must equal the
    # loss computed from the full logits of every position.
    from alignguard.capsule.model import _segment_loss

    model, tok = _model(family)
    assert model._has_logits_to_keep
    batch = collate(tok, examples, "capsule", 256)
    capsule, _ = model.build_capsule(batch.prompt_ids, batch.prompt_mask)
    B, P = batch.prompt_ids.shape
    embeds = torch.cat([model.embed(batch.prompt_ids), capsule, model.embed(batch.target_ids)], 1)
    mask = torch.cat([batch.prompt_mask, batch.prompt_mask.new_ones(B, K), batch.target_mask], 1)
    full = _segment_loss(model._lm(embeds, mask).logits, P + K, batch.target_ids, batch.target_mask)
    torch.testing.assert_close(model.task_loss(batch, capsule), full)
    logits = model.reconstruction_logits(capsule, batch.plan_ids, batch.plan_mask)
    full_recon = _segment_loss(logits, K, batch.plan_ids, batch.plan_mask)
    torch.testing.assert_close(model.reconstruction_loss(capsule, batch.plan_ids, batch.plan_mask), full_recon)
    text = collate(tok, examples, "cot", 256)
    embeds = torch.cat([model.embed(text.prompt_ids), model.embed(text.target_ids)], 1)
    mask = torch.cat([text.prompt_mask, text.target_mask], 1)
    full_text = _segment_loss(
        model._lm(embeds, mask).logits, text.prompt_ids.shape[1], text.target_ids, text.target_mask
    )
    torch.testing.assert_close(model.text_loss(text), full_text)


def test_reconstruction_with_fixed_capsule_ignores_the_question(llama, examples, monkeypatch):
    model, tok = llama
    a = collate(tok, examples[:2], "capsule", 256)
    b = collate(tok, examples[2:4], "capsule", 256)
    # Same plans and targets, different questions.
    b.plan_ids, b.plan_mask, b.target_ids, b.target_mask = a.plan_ids, a.plan_mask, a.target_ids, a.target_mask
    fixed, _ = model.build_capsule(a.prompt_ids, a.prompt_mask)
    monkeypatch.setattr(model, "build_capsule", lambda *args, **kw: (fixed, None))
    la, lb = model.capsule_losses(a), model.capsule_losses(b)
    assert torch.equal(la["recon_loss"], lb["recon_loss"])
    assert not torch.equal(la["task_loss"], lb["task_loss"])  # the task pass does read the question
    logits = model.reconstruction_logits(fixed, a.plan_ids, a.plan_mask)
    assert logits.shape[:2] == (2, K + a.plan_ids.shape[1])


def test_reconstruction_gradient_reaches_the_question_only_through_the_capsule(llama, examples):
    model, tok = llama
    batch = collate(tok, examples[:2], "capsule", 256)
    q = model.embed(batch.prompt_ids).detach().requires_grad_(True)
    capsule, _ = model.build_capsule(inputs_embeds=q, prompt_mask=batch.prompt_mask)
    recon = model.reconstruction_loss(capsule, batch.plan_ids, batch.plan_mask)
    g_total, g_capsule = torch.autograd.grad(recon, [q, capsule], retain_graph=True)
    (g_via_capsule,) = torch.autograd.grad(capsule, q, grad_outputs=g_capsule)
    assert g_total.abs().sum() > 0
    torch.testing.assert_close(g_total, g_via_capsule)  # chain rule through the capsule is the whole gradient
    # Cut the capsule path: nothing else connects the question to the reconstruction loss.
    cut = model.reconstruction_loss(capsule.detach(), batch.plan_ids, batch.plan_mask)
    assert torch.autograd.grad(cut, q, allow_unused=True)[0] is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_with_kv_cache_equals_full_recompute(family, examples):
    model, tok = _model(family)
    batch = collate(tok, examples, "capsule", 256)
    eos = tok.eos_token_id
    cached, capsule = model.generate(batch.prompt_ids, batch.prompt_mask, 24, eos, use_cache=True)
    full, _ = model.generate(batch.prompt_ids, batch.prompt_mask, 24, eos, use_cache=False)
    assert cached == full and all(len(r) > 0 for r in cached)
    assert model.decode_plan(capsule, 16, eos) == model.decode_plan(capsule, 16, eos, use_cache=False)
    zero = torch.zeros_like(capsule)
    assert (
        model.generate(batch.prompt_ids, batch.prompt_mask, 12, eos, capsule=zero)[0]
        == model.generate(batch.prompt_ids, batch.prompt_mask, 12, eos, capsule=zero, use_cache=False)[0]
    )
    assert model.generate_text(batch.prompt_ids, batch.prompt_mask, 12, eos) == model.generate_text(
        batch.prompt_ids, batch.prompt_mask, 12, eos, use_cache=False
    )


def test_generation_stops_at_eos(llama):
    model, tok = llama
    ex = CapsuleExample("q?", "add a", "1+1=2", "2", 1)
    batch = collate(tok, [ex, ex], "capsule", 64)
    # Make eos the argmax everywhere: generation must stop immediately with nothing visible.
    with torch.no_grad():
        head = model.lm.get_output_embeddings()
        head.weight.zero_()
        head.weight[tok.eos_token_id] = 1.0
        try:
            rows, _ = model.generate(batch.prompt_ids, batch.prompt_mask, 10, tok.eos_token_id)
        finally:
            head.weight.normal_(0, 0.02)
    assert rows == [[], []]


def test_losses_fall_on_a_small_set(tmp_path):
    model, tok = _model("llama")
    exs = generate_problems(4, 2, 2, seed=5, num_distractors=0)
    cfg = CapsuleTrainConfig(
        cot_steps=2,
        capsule_steps=10,
        batch_size=4,
        learning_rate=5e-3,
        warmup_steps=0,
        save_steps=100,
        show_progress_bar=False,
    )
    hist = train_capsule(model, tok, exs, cfg, tmp_path, logging_sink=None)["history"]
    stage2 = [h for h in hist if h["stage"] == 2]
    assert stage2[-1]["task_loss"] < 0.8 * stage2[0]["task_loss"]
    assert stage2[-1]["recon_loss"] < 0.8 * stage2[0]["recon_loss"]
    assert [h for h in hist if h["stage"] == 1][-1]["cot_loss"] < hist[0]["cot_loss"]


def test_lambda_zero_skips_reconstruction(llama, examples):
    model, tok = llama
    losses = model.capsule_losses(collate(tok, examples[:2], "capsule", 256), recon_lambda=0.0)
    assert torch.isnan(losses["recon_loss"]) and torch.equal(losses["loss"], losses["task_loss"])


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--num_capsule_tokens"):
        CapsuleModelConfig(num_capsule_tokens=0)
    with pytest.raises(ValueError, match="--bottleneck_rank"):
        CapsuleModelConfig(bottleneck_rank=0)
    with pytest.raises(ValueError, match="--recon_lambda"):
        CapsuleTrainConfig(recon_lambda=-1)
    from alignguard.models import ModelLoadError

    # A bad --model goes through the package loader and its error names the flag and the spec.
    with pytest.raises(ModelLoadError, match=r"^--model /nonexistent/model: model path .* does not exist"):
        build_capsule_model(CapsuleModelConfig(model="/nonexistent/model"))
    with pytest.raises(ModelLoadError, match=r"^--model no-such-model: unknown model .*smollm2-135m-instruct"):
        build_capsule_model(CapsuleModelConfig(model="no-such-model"))
