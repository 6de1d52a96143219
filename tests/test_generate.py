"""Tests for DriftCheck generation: batching, decoding, caching.

Run: python -m pytest -q tests/test_generate.py
"""

import copy
import json

import pytest
import torch

from alignguard.driftcheck.generate import (
    GenerationSettings,
    cache_key,
    format_prompt,
    generate_responses,
    generate_token_ids,
)
from alignguard.fingerprint import weights_fingerprint as model_fingerprint
from alignguard.tiny import make_tiny_model

# Different lengths, deliberately unsorted, so length-sorting and left padding both matter.
PROMPTS = ["hi", "How do I bake a cake for my grandmother's birthday?", "Tell me a joke", "abc def ghi"]
SETTINGS = GenerationSettings(max_new_tokens=6, batch_size=4)


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama").eval()


def _reference_ids(model, tokenizer, prompt, settings):
    """Unbatched, unpadded greedy generation with plain `model.generate`."""
    ids = tokenizer(format_prompt(tokenizer, prompt, settings), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    return new


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_left_padded_equals_unbatched(family, tiny_tokenizer):
    model = make_tiny_model(family).eval()
    batched = generate_token_ids(model, tiny_tokenizer, PROMPTS, SETTINGS)
    reference = [_reference_ids(model, tiny_tokenizer, p, SETTINGS) for p in PROMPTS]
    assert batched == reference
    assert all(len(r) > 0 for r in reference)


def test_responses_decode_only_new_tokens_in_order(llama, tiny_tokenizer):
    prompts = PROMPTS + ["hi"]  # a duplicate must come back at its own position too
    got = generate_responses(
        llama, tiny_tokenizer, prompts, GenerationSettings(max_new_tokens=6, batch_size=2), progress=False
    )
    expected = [
        tiny_tokenizer.decode(_reference_ids(llama, tiny_tokenizer, p, SETTINGS), skip_special_tokens=True)
        for p in prompts
    ]
    assert got == expected
    for prompt, response in zip(prompts, got):
        assert prompt not in response and "<|" not in response


def test_restores_state_and_pads_with_eos_without_pad_token(llama, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)  # the fixture is session-wide: mutate a copy
    tok.padding_side = "right"
    tok.pad_token = None
    llama.train()
    try:
        got = generate_responses(llama, tok, PROMPTS[:2], SETTINGS, progress=False)
        assert llama.training and tok.padding_side == "right"
    finally:
        llama.eval()
    with_pad = generate_responses(llama, tiny_tokenizer, PROMPTS[:2], SETTINGS, progress=False)
    assert got == with_pad


def _count_generate_calls(model, monkeypatch):
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    return calls


def test_cache_hit_identical_and_invalidated_by_weight_change(tiny_tokenizer, tmp_path, monkeypatch):
    model = make_tiny_model("llama").eval()
    calls = _count_generate_calls(model, monkeypatch)
    first = generate_responses(model, tiny_tokenizer, PROMPTS, SETTINGS, cache_dir=tmp_path, progress=False)
    assert sum(calls) == len(PROMPTS)
    second = generate_responses(model, tiny_tokenizer, PROMPTS, SETTINGS, cache_dir=tmp_path, progress=False)
    assert second == first and sum(calls) == len(PROMPTS)  # no new generation

    # "Fine-tune" one weight: the fingerprint and the cache key change, so everything is generated again.
    key_before = cache_key(model, tiny_tokenizer, SETTINGS)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 0.5
    assert cache_key(model, tiny_tokenizer, SETTINGS) != key_before
    generate_responses(model, tiny_tokenizer, PROMPTS, SETTINGS, cache_dir=tmp_path, progress=False)
    assert sum(calls) == 2 * len(PROMPTS)
    assert len(list(tmp_path.glob("*.jsonl"))) == 2

    # Other settings are another key too.
    other = GenerationSettings(max_new_tokens=3, batch_size=4)
    assert cache_key(model, tiny_tokenizer, other) != cache_key(model, tiny_tokenizer, SETTINGS)


def test_cache_resumes_after_partial_run(llama, tiny_tokenizer, tmp_path, monkeypatch):
    settings = GenerationSettings(max_new_tokens=4, batch_size=2)
    full = generate_responses(llama, tiny_tokenizer, PROMPTS, settings, progress=False)
    # A run killed after two prompts leaves a complete file with two records (plus, say, a torn line).
    generate_responses(llama, tiny_tokenizer, PROMPTS[:2], settings, cache_dir=tmp_path, progress=False)
    (cache_file,) = tmp_path.glob("*.jsonl")
    lines = cache_file.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["response"] is not None for line in lines)
    cache_file.write_text(cache_file.read_text() + '{"prompt_sha256": "torn')

    calls = _count_generate_calls(llama, monkeypatch)
    resumed = generate_responses(llama, tiny_tokenizer, PROMPTS, settings, cache_dir=tmp_path, progress=False)
    assert resumed == full
    assert sum(calls) == len(PROMPTS) - 2
    assert len(cache_file.read_text().splitlines()) == len(PROMPTS)


def test_peft_model_fingerprint_tracks_adapter_state(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = make_tiny_model("llama").eval()
    base_fp = model_fingerprint(base)
    base_out = generate_responses(base, tiny_tokenizer, PROMPTS[:2], SETTINGS, progress=False)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    tuned_fp = model_fingerprint(peft_model)
    assert tuned_fp != base_fp
    with peft_model.disable_adapter():
        disabled_fp = model_fingerprint(peft_model)
        disabled_out = generate_responses(peft_model, tiny_tokenizer, PROMPTS[:2], SETTINGS, progress=False)
    assert disabled_fp != tuned_fp
    assert disabled_out == base_out  # adapter off = base model
    tuned_out = generate_responses(peft_model, tiny_tokenizer, PROMPTS[:2], SETTINGS, progress=False)
    assert len(tuned_out) == 2


def test_settings_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        GenerationSettings(batch_size=0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationSettings(max_new_tokens=4, min_new_tokens=5)


def test_system_prompt_is_rendered(tiny_tokenizer):
    text = format_prompt(tiny_tokenizer, "hello", GenerationSettings(system_prompt="be nice"))
    assert text == "<|system|>be nice<|user|>hello<|assistant|>"
    plain = format_prompt(tiny_tokenizer, "hello", GenerationSettings(use_chat_template=False))
    assert plain == "User: hello\nAssistant: "  # the plain format training uses without a chat template
