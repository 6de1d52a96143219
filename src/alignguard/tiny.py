"""Tiny, offline models and a byte-level tokenizer, built from configs.

Used by the tests, the benchmarks and `--model tiny-*` dry runs. Nothing here touches a hub: the
tokenizer is a byte-level BPE with no merges built with `tokenizers`, and the models are random
initialisations of real architectures (Llama, Qwen2, GPT-2 with its Conv1D layers).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]

# A minimal chat template in the style of the real ones: role markers, assistant turn closed by eos.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|eos|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TINY_FAMILIES = ("llama", "qwen2", "gpt2")


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (256 byte tokens + specials) with a chat template; no files, no network."""
    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_unicode))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def make_tiny_model(
    family: str = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    intermediate_size: int = 64,
    vocab_size: int | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """A randomly initialised causal LM of the given family, small enough for CPU tests."""
    vocab_size = vocab_size or (256 + len(SPECIAL_TOKENS))
    tok_ids = dict(pad_token_id=256, bos_token_id=257, eos_token_id=258)
    # Llama and Qwen2 take the same fields; Qwen2 ties its embeddings, as the real 0.5B models do.
    llama_like = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=num_layers,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        **tok_ids,
    )
    if family == "llama":
        cfg = LlamaConfig(tie_word_embeddings=False, **llama_like)
    elif family == "qwen2":
        cfg = Qwen2Config(tie_word_embeddings=True, **llama_like)
    elif family == "gpt2":
        cfg = GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_inner=intermediate_size,
            vocab_size=vocab_size,
            n_positions=512,
            **tok_ids,
        )
    else:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {TINY_FAMILIES}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.config.use_cache = False
    return model.float()


def tiny_target_modules(family: str) -> list[str]:
    """Names of the LoRA target projections in a tiny model of `family`."""
    if family == "gpt2":
        return ["c_attn", "c_proj", "c_fc"]
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
