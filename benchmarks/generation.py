"""Benchmark: DriftCheck's batched, left-padded generation vs a per-prompt `model.generate` loop.

    python benchmarks/generation.py                          # random Llama (hidden 512, 8 layers), CPU
    python benchmarks/generation.py --model PATH --n-prompts 64 --batch-size 32   # a real local model

Both paths run greedy decoding on the same prompts and model in one process. The tiny test models are
too small for this (per-step Python overhead is all there is), so the default model is a Llama built
from a config with a realistic-ish shape and random weights. `min_new_tokens = max_new_tokens` forces
every row to the same length: a random model emits eos at random positions, which would make the two
paths generate different numbers of tokens and the comparison meaningless. Tokens/s counts new tokens.

Writes `benchmarks/results/generation.json` (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from alignguard.cli.common import atomic_write_text
from alignguard.driftcheck.generate import GenerationSettings, format_prompt, generate_responses, generate_token_ids

FALLBACK_PROMPTS = [
    "How do I bake sourdough bread at home?",
    "Explain how vaccines train the immune system.",
    "Write a short poem about the sea.",
    "What is the capital of Australia?",
    "Give me three tips for a job interview.",
    "Summarise the plot of Hamlet in two sentences.",
    "How does a refrigerator keep food cold?",
    "Translate 'good morning' into French and Spanish.",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
    "What are the health benefits of regular exercise?",
    "Describe how a bill becomes a law in the United States, step by step, in plain language.",
]


def load_prompts(n: int) -> list[str]:
    try:
        from alignguard.driftcheck.prompts import bundled_prompts

        texts = [r.prompt for r in bundled_prompts("small")]
    except Exception:  # noqa: BLE001 - the bundled set is optional here; fall back to a fixed list
        texts = FALLBACK_PROMPTS
    # Repeat with a suffix so prompts stay distinct (generate_responses deduplicates identical prompts).
    return [texts[i % len(texts)] + ("" if i < len(texts) else f" (variant {i // len(texts)})") for i in range(n)]


def build_model(args):
    from alignguard.tiny import make_tiny_tokenizer

    if args.model:
        from alignguard.models import load_model_and_tokenizer

        model, tok, _ = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
        return model, tok, str(args.model)
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(args.device or "cpu").eval()
    name = f"random-llama-h{args.hidden}-l{args.layers}-v{args.vocab}"
    return model, tok, name


def per_prompt_loop(model, tok, prompts, settings) -> list[list[int]]:
    """The naive baseline: one unpadded `model.generate` call per prompt."""
    device = next(model.parameters()).device
    out = []
    for p in prompts:
        ids = tok(format_prompt(tok, p, settings), add_special_tokens=False, return_tensors="pt").to(device)
        gen = model.generate(
            **ids,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        out.append(gen[0, ids["input_ids"].shape[1] :].tolist())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Local HF model folder (default: a random Llama).")
    parser.add_argument("--hidden", type=int, default=512, help="Hidden size of the random Llama.")
    parser.add_argument("--layers", type=int, default=8, help="Layers of the random Llama.")
    parser.add_argument("--vocab", type=int, default=32768, help="Vocabulary size of the random Llama.")
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="Only for --model (auto = float32 on CPU).")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, name = build_model(args)
    prompts = load_prompts(args.n_prompts)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    with torch.no_grad():  # warm-up: first calls pay for lazy initialisation in torch and transformers
        generate_token_ids(model, tok, prompts[:2], GenerationSettings(max_new_tokens=2, batch_size=2))

    t0 = time.perf_counter()
    with torch.no_grad():
        loop_ids = per_prompt_loop(model, tok, prompts, settings)
    t_loop = time.perf_counter() - t0

    t0 = time.perf_counter()
    generate_responses(model, tok, prompts, settings, cache_dir=None, progress=False)
    t_batched = time.perf_counter() - t0
    # Token agreement of the two paths (fp32 greedy: expected 1.0 up to rare near-ties in random logits).
    with torch.no_grad():
        batched_ids = []
        for i in range(0, len(prompts), args.batch_size):
            batched_ids += generate_token_ids(model, tok, prompts[i : i + args.batch_size], settings)
    agree = sum(a == b for a, b in zip(loop_ids, batched_ids)) / len(prompts)

    n_tokens = len(prompts) * args.max_new_tokens
    rows = [
        ("per-prompt generate loop", t_loop, n_tokens / t_loop),
        (f"batched (batch {args.batch_size}, left-padded)", t_batched, n_tokens / t_batched),
    ]
    speedup = t_loop / t_batched
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {name} ({n_params / 1e6:.1f}M params), {len(prompts)} prompts x {args.max_new_tokens} new tokens, "
        f"device {next(model.parameters()).device}, {torch.get_num_threads()} threads"
    )
    print(f"{'method':<36}{'seconds':>10}{'new tok/s':>12}")
    for label, secs, tps in rows:
        print(f"{label:<36}{secs:>10.2f}{tps:>12.1f}")
    print(f"speedup: {speedup:.1f}x   identical sequences: {agree:.0%}")

    result = {
        "benchmark": "generation",
        "model": name,
        "n_params": n_params,
        "n_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "seconds_per_prompt_loop": t_loop,
        "seconds_batched": t_batched,
        "tokens_per_s_per_prompt_loop": n_tokens / t_loop,
        "tokens_per_s_batched": n_tokens / t_batched,
        "speedup": speedup,
        "identical_sequences_fraction": agree,
        "meta": {
            "device": str(next(model.parameters()).device),
            "threads": torch.get_num_threads(),
            # Shared CI/dev machines are often busy; the load average tells how much to trust the timings.
            "load_average_1m": os.getloadavg()[0],
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
