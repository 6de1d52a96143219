"""Shared fixtures: tiny config-built models and a local byte tokenizer (no network).

Run: python -m pytest -q
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models are dominated by per-op overhead: one thread is as fast, and does not thrash on a busy machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from alignguard.tiny import make_tiny_tokenizer

    return make_tiny_tokenizer()
