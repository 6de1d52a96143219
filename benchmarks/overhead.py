"""AlignGuard overhead vs plain PEFT LoRA, Fisher pass throughput, subspace extraction time.

    python benchmarks/overhead.py                 # CPU: small Llama-shape model (target step ratio <= 1.10)
    python benchmarks/overhead.py --preset 1b     # GPU: 1.1B Llama shape, bf16, 8x1024 tokens (target <= 1.03)
    python benchmarks/overhead.py --kfac          # the two-sided K-FAC alignment term (input factor too)

Everything is measured as a ratio against a baseline in the same run, with the same model, batch and seed:
- step: (forward + backward + AdamW step + all AlignGuard terms) / (the same without the terms); plain and
  AlignGuard steps are interleaved so drifts in machine load hit both;
- fisher: Fisher-pass tokens/s / plain forward+backward tokens/s (target >= 0.9 on a GPU);
- subspaces: time to extract U for every module, randomized vs exact eigh.
Prints a table and writes benchmarks/results/overhead[_<preset>].json (atomically).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from alignguard import AlignGuardConfig, AlignGuardRegularizer, FisherConfig, SubspaceConfig  # noqa: E402
from alignguard.fisher import estimate_fisher  # noqa: E402
from alignguard.io import atomic_write_json, package_versions  # noqa: E402
from alignguard.subspace import build_subspaces  # noqa: E402

PRESETS = {
    # A SmolLM-like small Llama shape that steps in well under a second on a 2-core CPU.
    "cpu": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
        batch=4,
        seq=256,
        dtype="float32",
    ),
    # TinyLlama-1.1B shape (docs/design.md §4 measurements).
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        batch=8,
        seq=1024,
        dtype="bfloat16",
    ),
    # SmolLM2-135M shape (HuggingFaceTB/SmolLM2-135M config; random weights, nothing is downloaded).
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        batch=4,
        seq=256,
        dtype="float32",
    ),
}
# Keys of a preset that describe the benchmark rather than the LlamaConfig.
RUN_KEYS = ("batch", "seq", "dtype", "tie_word_embeddings")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# The clock of the timing loops. Wall time by default; `use_cpu_clock()` switches to this process's CPU time,
# which on a machine that other jobs share (and with one torch thread, so no thread waits on another) counts
# the work done rather than the time spent descheduled.
clock = time.perf_counter


def use_cpu_clock(enabled: bool = True) -> None:
    global clock
    clock = time.process_time if enabled else time.perf_counter


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_llama(preset: dict, device, seed=0):
    """A randomly initialised Llama of the preset's shape and dtype (nothing is downloaded)."""
    cfg = LlamaConfig(
        **{k: v for k, v in preset.items() if k not in RUN_KEYS},
        max_position_embeddings=max(2048, preset["seq"]),
        tie_word_embeddings=preset.get("tie_word_embeddings", False),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=getattr(torch, preset["dtype"]))
    model.config.use_cache = False
    return model


def build(preset: dict, device, seed=0, r=16):
    model = random_llama(preset, device, seed)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # non-zero B so every term is really computed
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    return peft_model


def batch_for(preset, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, preset["vocab_size"], (preset["batch"], preset["seq"]), generator=gen).to(device)
    labels = ids.clone()
    labels[:, : preset["seq"] // 4] = -100  # a prompt part, as in SFT data
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_regularizer(model, preset, device, kfac=False, fisher_config: FisherConfig | None = None):
    """Fisher factors on two batches -> subspaces -> an `AlignGuardRegularizer` on `model` (all terms on)."""
    fisher_batches = [batch_for(preset, device, seed=s) for s in range(2)]
    config = fisher_config or FisherConfig(show_progress=False, input_factor=kfac)
    state = estimate_fisher(model, fisher_batches, config)
    subspaces = build_subspaces(state, SubspaceConfig())
    ag_config = AlignGuardConfig(geo_metric="euclidean", alignment_input="kfac" if kfac else "identity")
    return state, subspaces, AlignGuardRegularizer(model, subspaces, ag_config)


def time_steps(plain, guarded, reg, batch, device, steps, warmup):
    """Seconds per training step of `plain` (task loss only) and `guarded` (task loss + `reg`), interleaved.

    `plain` may be the same model as `guarded` (the regulariser is then simply left out of its loss); each
    model gets its own AdamW over its trainable parameters. Returns {"plain": [...], "alignguard": [...]},
    the i-th entries of the two lists measured back to back.
    """
    opts = {}
    for m in (plain, guarded):
        if id(m) not in opts:
            opts[id(m)] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

    def step(model, with_reg):
        _sync(device)
        t0 = clock()
        loss = model(**batch).loss
        if with_reg:
            loss = loss + reg()["total"]
        loss.backward()
        opts[id(model)].step()
        opts[id(model)].zero_grad(set_to_none=True)
        _sync(device)
        return clock() - t0

    times = {"plain": [], "alignguard": []}
    for i in range(warmup + steps):
        # Interleave, alternating which goes first, so load drifts affect both equally.
        order = [("plain", plain, False), ("alignguard", guarded, True)]
        for name, model, with_reg in order if i % 2 == 0 else order[::-1]:
            t = step(model, with_reg)
            if i >= warmup:
                times[name].append(t)
    return times


def time_regulariser(reg, model, device, n):
    """Median seconds of the regulariser's forward + backward alone (no model pass)."""
    reg_only = []
    for _ in range(n):
        _sync(device)
        t0 = clock()
        reg()["total"].backward()
        _sync(device)
        reg_only.append(clock() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(reg_only)


def bench_steps(preset, device, steps, warmup, kfac=False):
    plain, guarded = build(preset, device), build(preset, device)
    batch = batch_for(preset, device)
    state, subspaces, reg = make_regularizer(guarded, preset, device, kfac)
    times = time_steps(plain, guarded, reg, batch, device, steps, warmup)
    return times, time_regulariser(reg, guarded, device, max(3, steps // 2)), state, subspaces, reg


def time_fisher_vs_fwd_bwd(model, batches, config: FisherConfig, device, repeats):
    """Fisher-pass seconds and plain forward+backward seconds over the same `batches`, `repeats` times.

    The two are interleaved (alternating which goes first) after one warm-up of each, so load drifts hit
    both. The forward+backward is the training pass without the optimizer: the PEFT model's loss on the
    data labels, backward into the trainable (LoRA) parameters. Returns the per-repeat seconds and the
    tokens (response labels) per pass.
    """
    tokens = sum(int((b["labels"] != -100).sum()) for b in batches)

    def fisher():
        estimate_fisher(model, batches, config)

    def fwd_bwd():
        for b in batches:
            model(**b).loss.backward()
        model.zero_grad(set_to_none=True)

    estimate_fisher(model, batches[:1], config)  # warm-up
    model(**batches[0]).loss.backward()
    model.zero_grad(set_to_none=True)
    seconds = {"fisher": [], "fwd_bwd": []}
    for i in range(repeats):
        order = [("fisher", fisher), ("fwd_bwd", fwd_bwd)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            seconds[name].append(clock() - t0)
    return seconds, tokens


def bench_fisher(preset, device, repeats, kfac=False, n_batches=4):
    model = build(preset, device)
    batches = [batch_for(preset, device, seed=s) for s in range(n_batches)]
    config = FisherConfig(show_progress=False, input_factor=kfac)
    seconds, tokens = time_fisher_vs_fwd_bwd(model, batches, config, device, repeats)
    fisher_s, plain_s = statistics.median(seconds["fisher"]), statistics.median(seconds["fwd_bwd"])
    return {
        "fisher_tokens_per_s": tokens / fisher_s,
        "fwd_bwd_tokens_per_s": tokens / plain_s,
        "ratio": plain_s / fisher_s,
        "ratio_per_repeat": [p / f for p, f in zip(seconds["fwd_bwd"], seconds["fisher"])],
    }


def bench_subspaces(state):
    out = {}
    for method in ("exact", "randomized"):
        t0 = time.perf_counter()
        subs = build_subspaces(state, SubspaceConfig(eigen_solver=method))
        out[method] = {
            "seconds": time.perf_counter() - t0,
            "mean_m": statistics.mean(s.m for s in subs.subspaces.values()),
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kfac", action="store_true", help="Two-sided K-FAC alignment term (input factor too).")
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/overhead[_preset][_kfac].json)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    torch.backends.cuda.matmul.allow_tf32 = True

    times, reg_s, state, _subs, reg = bench_steps(preset, device, args.steps, args.warmup, args.kfac)
    plain_s, ag_s = statistics.median(times["plain"]), statistics.median(times["alignguard"])
    fisher = bench_fisher(preset, device, repeats=3, kfac=args.kfac)
    subspaces = bench_subspaces(state)
    result = {
        "preset": args.preset,
        "alignment_input": "kfac" if args.kfac else "identity",
        "shape": preset,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "n_modules": reg.n_modules,
        "n_shape_groups": len(reg.groups),
        "step_seconds": {"plain_lora": plain_s, "alignguard": ag_s, "regulariser_fwd_bwd": reg_s},
        "step_ratio": ag_s / plain_s,
        "fisher": fisher,
        "subspaces": subspaces,
        "targets": {"step_ratio_cpu": 1.10, "step_ratio_gpu": 1.03, "fisher_ratio_gpu": 0.9, "subspaces_gpu_s": 1.0},
        "versions": package_versions(),
    }
    suffix = ("" if args.preset == "cpu" else "_" + args.preset) + ("_kfac" if args.kfac else "")
    out = Path(args.out or Path(__file__).parent / "results" / f"overhead{suffix}.json")
    atomic_write_json(out, result)
    rows = [
        ("plain LoRA step (s)", f"{plain_s:.4f}"),
        ("AlignGuard step (s)", f"{ag_s:.4f}"),
        ("step ratio (target <= 1.10 CPU / 1.03 GPU)", f"{result['step_ratio']:.3f}"),
        ("regulariser fwd+bwd alone (s)", f"{reg_s:.4f}"),
        ("Fisher tokens/s / fwd+bwd tokens/s", f"{fisher['ratio']:.3f}"),
        ("subspaces, exact eigh (s)", f"{subspaces['exact']['seconds']:.3f}"),
        ("subspaces, randomized (s)", f"{subspaces['randomized']['seconds']:.3f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(
        f"\n{result['device']}, preset {args.preset}, R_A input metric {result['alignment_input']}, "
        f"{reg.n_modules} LoRA modules in {len(reg.groups)} shape groups"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"JSON: {out}")
    return result


if __name__ == "__main__":
    main()
