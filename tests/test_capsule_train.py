"""R-Capsule training: resume from a checkpoint equals an uninterrupted run; save/load; LoRA variant.

Run: python -m pytest -q tests/test_capsule_train.py
"""

import json

import torch

from alignguard.capsule.config import CapsuleModelConfig, CapsuleTrainConfig
from alignguard.capsule.data import generate_problems
from alignguard.capsule.model import build_capsule_model, load_weights
from alignguard.capsule.train import STAGE1_DIR, batch_indices, latest_checkpoint, train_capsule


def _setup(family="gpt2", **model_kw):
    cfg = CapsuleModelConfig(model=f"tiny-{family}", tiny_hidden_size=32, bottleneck_rank=8, **model_kw)
    return build_capsule_model(cfg, seed=1)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_batch_indices_cover_each_epoch_and_are_stateless():
    n, bs = 10, 4
    first_epoch = [i for s in range(0, 2) for i in batch_indices(n, bs, 0, s)] + batch_indices(n, bs, 0, 2)[:2]
    assert sorted(first_epoch) == list(range(n))
    assert batch_indices(n, bs, 0, 7) == batch_indices(n, bs, 0, 7)
    assert batch_indices(n, bs, 0, 1) != batch_indices(n, bs, 1, 1)


def test_resume_matches_uninterrupted_run(tmp_path):
    # gpt2 has dropout, so this also checks that dropout masks depend only on (seed, step).
    exs = generate_problems(12, 2, 2, seed=2, num_distractors=0)
    cfg = CapsuleTrainConfig(
        cot_steps=2,
        capsule_steps=2,
        batch_size=3,
        learning_rate=1e-3,
        warmup_steps=2,
        save_steps=1,
        save_total_limit=2,
        show_progress_bar=False,
    )
    model_a, tok = _setup()
    full = train_capsule(model_a, tok, exs, cfg, tmp_path / "a", logging_sink=None)

    model_b, _ = _setup()
    part = train_capsule(model_b, tok, exs, cfg, tmp_path / "b", stop_after=3, logging_sink=None)
    assert not part["done"] and latest_checkpoint(tmp_path / "b").name == "step-0000003"
    model_c, _ = _setup()  # a fresh process would build the model from scratch, then resume
    resumed = train_capsule(model_c, tok, exs, cfg, tmp_path / "b", logging_sink=None)
    assert resumed["resumed_from"] == 3 and resumed["done"]
    assert resumed["history"] == full["history"]
    sa, sc = _state(model_a), _state(model_c)
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    # save_total_limit=2 keeps the last two, plus the end-of-stage-1 checkpoint that --init_from needs.
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step-*"))
    assert kept == ["step-0000002", "step-0000003", "step-0000004"]
    assert (tmp_path / "a" / STAGE1_DIR / "capsule.safetensors").is_file()


def test_extending_a_finished_run_equals_a_fresh_longer_run(tmp_path):
    # `capsule train` with a larger --capsule_steps resumes a finished run; that is only honest if the first steps
    # of the longer schedule are the shorter run's (constant lr after warmup, batches and dropout from (seed, step)).
    import dataclasses

    exs = generate_problems(12, 2, 2, seed=4, num_distractors=0)
    short = CapsuleTrainConfig(
        cot_steps=1, capsule_steps=2, batch_size=3, learning_rate=1e-3, warmup_steps=2, show_progress_bar=False
    )
    longer = dataclasses.replace(short, capsule_steps=4)
    model_a, tok = _setup()
    fresh = train_capsule(model_a, tok, exs, longer, tmp_path / "fresh", logging_sink=None)
    model_b, _ = _setup()
    assert train_capsule(model_b, tok, exs, short, tmp_path / "ext", logging_sink=None)["done"]
    model_c, _ = _setup()
    extended = train_capsule(model_c, tok, exs, longer, tmp_path / "ext", logging_sink=None)
    assert extended["resumed_from"] == 3 and extended["history"] == fresh["history"]
    for (k, a), b in zip(_state(model_a).items(), _state(model_c).values()):
        assert torch.equal(a, b), k


def test_save_load_round_trip_and_stage1_snapshot(tmp_path):
    exs = generate_problems(6, 2, 2, seed=3, num_distractors=0)
    cfg = CapsuleTrainConfig(cot_steps=1, capsule_steps=1, batch_size=2, save_steps=10, show_progress_bar=False)
    model, tok = _setup("qwen2")  # tied embeddings: the safetensors save must cope with shared tensors
    train_capsule(model, tok, exs, cfg, tmp_path, logging_sink=None)
    fresh, _ = _setup("qwen2")
    load_weights(fresh, tmp_path)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    stage1, _ = _setup("qwen2")
    load_weights(stage1, tmp_path / STAGE1_DIR)
    # Stage 2 changed the LM after the snapshot, and the snapshot's capsule params are still the initial ones.
    assert not torch.equal(stage1.lm.lm_head.weight, model.lm.lm_head.weight)
    assert torch.equal(stage1.capsule_queries, _setup("qwen2")[0].capsule_queries)


def test_lora_trains_only_adapter_and_capsule(tmp_path):
    exs = generate_problems(6, 2, 2, seed=4, num_distractors=0)
    cfg = CapsuleTrainConfig(
        cot_steps=1, capsule_steps=2, batch_size=2, warmup_steps=0, save_steps=10, show_progress_bar=False
    )
    model, tok = _setup("llama", lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    before = _state(model)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_capsule(model, tok, exs, cfg, tmp_path, logging_sink=None)
    assert torch.equal(torch.rand(3), expected), "training must not change the caller's global RNG state"
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all("lora_" in k or not k.startswith("lm.") for k in changed), sorted(changed)
    assert {"capsule_queries", "down.weight", "up.weight"} <= changed
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    fresh, _ = _setup("llama", lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    load_weights(fresh, tmp_path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_local_model_folder_with_lora(tmp_path):
    # The real-model path: AutoModel/AutoTokenizer from a folder on disk (offline), chat template, LoRA on top.
    from alignguard.tiny import make_tiny_model, make_tiny_tokenizer

    folder = tmp_path / "model"
    make_tiny_model("qwen2", hidden_size=32).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    model, tok = build_capsule_model(CapsuleModelConfig(model=str(folder), lora_r=4, bottleneck_rank=8), seed=0)
    assert hasattr(model.lm, "peft_config") and tok.chat_template
    exs = generate_problems(4, 2, 2, seed=6, num_distractors=0)
    cfg = CapsuleTrainConfig(cot_steps=1, capsule_steps=1, batch_size=2, save_steps=10, show_progress_bar=False)
    train_capsule(model, tok, exs, cfg, tmp_path / "run", logging_sink=None)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    from alignguard.capsule.data import collate

    batch = collate(tok, exs[:2], "capsule", 256)
    rows, capsule = model.eval().generate(batch.prompt_ids, batch.prompt_mask, 5, tok.eos_token_id)
    assert len(rows) == 2 and capsule.shape == (2, 2, 32)
