"""R-Capsule on CUDA (skipped without a GPU): bf16 training steps and KV-cache decoding on the device.

Run: python -m pytest -q -m gpu tests/test_capsule_gpu.py
"""

import pytest
import torch

from alignguard.capsule.config import CapsuleModelConfig, CapsuleTrainConfig
from alignguard.capsule.data import collate, generate_problems
from alignguard.capsule.model import build_capsule_model
from alignguard.capsule.train import train_capsule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_train_and_generate_on_cuda(tmp_path):
    cfg = CapsuleModelConfig(model="tiny-llama", tiny_hidden_size=32, bottleneck_rank=8, device="cuda")
    model, tok = build_capsule_model(cfg)
    assert model.device.type == "cuda"
    exs = generate_problems(4, 2, 2, seed=0, num_distractors=0)
    train = CapsuleTrainConfig(cot_steps=1, capsule_steps=2, batch_size=2, save_steps=10, show_progress_bar=False)
    hist = train_capsule(model, tok, exs, train, tmp_path, logging_sink=None)["history"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    batch = collate(tok, exs, "capsule", 256)
    ids, mask = batch.prompt_ids.cuda(), batch.prompt_mask.cuda()
    model.eval()
    cached, _ = model.generate(ids, mask, 16, tok.eos_token_id)
    full, _ = model.generate(ids, mask, 16, tok.eos_token_id, use_cache=False)
    # GPU kernels may reduce in a different order with and without the cache; demand agreement on a prefix only.
    assert [r[:8] for r in cached] == [r[:8] for r in full]
