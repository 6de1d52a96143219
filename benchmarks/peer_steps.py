"""Training-step time of each compare row's Trainer against plain LoRA's, in one process, steps interleaved.

    python benchmarks/peer_steps.py                          # CPU preset (random Llama, h=256, 4 layers)
    python benchmarks/peer_steps.py --preset smollm2-135m    # the SmolLM2-135M shape (random weights)

`alignguard compare` records each row's mean step time, but rows often run in separate `compare` invocations (a
later run adds rows and reuses the finished ones), so its step ratios can compare one process's machine state with
another's. This benchmark is the same-run ratio the compare's column stands in for: every Trainer subclass the
compare uses (`transformers.Trainer` for plain LoRA, `AlignGuardTrainer`, `AsftTrainer`, `LisaTrainer`,
`SurgeryTrainer`) gets its own copy of one model and one AdamW, and the steps are interleaved (the order rotates
every step) on the same batch, so a drift in machine load hits every method alike. A step is the Trainer's own
`training_step` (its `compute_loss` with the method's term, and the backward) plus the optimizer step: the code the
compare runs, without the Trainer loop's data loading and logging, which every method shares.

The "aligned" model is the random model plus a rank-32 delta on every target projection (the compare's aligned
models are a merged LoRA SFT + DPO, rank <= 32), the AsFT factors come from that delta, the AlignGuard subspaces
from a Fisher pass on two random batches, and Lisa / surgery step on two other random batches. Prints a table and
writes benchmarks/results/peer_steps[_<preset>].json (atomically).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead  # noqa: E402  (the presets, batches and clock shared with the overhead benchmark)

from alignguard import AlignGuardConfig, FisherConfig, SubspaceConfig  # noqa: E402
from alignguard.asft import build_asft_factors  # noqa: E402
from alignguard.fisher import estimate_fisher  # noqa: E402
from alignguard.gradient_surgery import SurgeryConfig  # noqa: E402
from alignguard.io import atomic_write_json, package_versions  # noqa: E402
from alignguard.lisa import LisaConfig  # noqa: E402
from alignguard.recipes.asft import AsftTrainer  # noqa: E402
from alignguard.recipes.lisa import LisaTrainer  # noqa: E402
from alignguard.recipes.surgery import SurgeryTrainer  # noqa: E402
from alignguard.subspace import build_subspaces  # noqa: E402
from alignguard.trainer import AlignGuardTrainer  # noqa: E402

# The compare's LoRA: r = 8 on q/k/v/o (configs/smollm2/compare.yaml keeps TrainRunConfig's defaults).
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = ("plain_lora", "alignguard", "asft", "lisa", "surgery")
ALIGNED_DELTA_RANK = 32


def build_models(preset: dict, device, seed: int = 0):
    """(aligned model, base model): a random Llama of the preset's shape and the same plus a low-rank delta."""
    base = overhead.random_llama(preset, device, seed)
    aligned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in aligned.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                d_out, d_in = module.weight.shape
                u = torch.randn(d_out, ALIGNED_DELTA_RANK, generator=gen) / ALIGNED_DELTA_RANK
                v = torch.randn(ALIGNED_DELTA_RANK, d_in, generator=gen) * 1e-2
                module.weight.add_((u @ v).to(module.weight))
    return aligned, base


def with_lora(model, r: int = 8):
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    with torch.no_grad():  # non-zero B, as after a few steps, so every term is really computed
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    return peft_model


def build_trainers(preset: dict, device, out_dir: str, max_steps: int) -> dict:
    """One Trainer per method, each on its own LoRA copy of the aligned model, with its optimizer created."""
    aligned, base = build_models(preset, device)
    alignment = [overhead.batch_for(preset, device, seed=s) for s in (11, 12)]
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=preset["batch"],
        learning_rate=1e-4,
        max_steps=max_steps,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
    )
    fisher_model = with_lora(aligned)
    state = estimate_fisher(fisher_model, alignment, FisherConfig(show_progress=False))
    subspaces = build_subspaces(state, SubspaceConfig())
    extra = {
        "plain_lora": (Trainer, {}),
        "alignguard": (
            AlignGuardTrainer,
            dict(subspaces=subspaces, fisher_state=state, alignguard_config=AlignGuardConfig(geo_metric="euclidean")),
        ),
        "asft": (AsftTrainer, dict(asft_factors=build_asft_factors(aligned, base, TARGETS))),
        # Lisa's default cycle (1 alignment step in 10); surgery's default interval.
        "lisa": (LisaTrainer, dict(alignment_batches=alignment, lisa_config=LisaConfig())),
        "surgery": (SurgeryTrainer, dict(alignment_batches=alignment, surgery_config=SurgeryConfig())),
    }
    trainers = {}
    for name in METHODS:
        cls, kw = extra[name]
        trainer = cls(model=with_lora(aligned), args=args, **kw)
        trainer.create_optimizer()
        trainer.state.max_steps = max_steps
        trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this bypasses
        trainers[name] = trainer
    return trainers


def time_trainer_steps(trainers: dict, batch: dict, device, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per optimizer step of each trainer, interleaved, the order rotating every step."""
    names = list(trainers)
    times = {n: [] for n in names}
    for i in range(warmup + steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            trainer = trainers[name]
            overhead._sync(device)
            t0 = overhead.clock()
            trainer.training_step(trainer.model, batch, None)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            overhead._sync(device)
            if i >= warmup:
                times[name].append(overhead.clock() - t0)
            trainer.state.global_step += 1
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(overhead.PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per method (Lisa: 1 in 10 alignment).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: this process's CPU time.")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/peer_steps[_preset].json)")
    args = parser.parse_args(argv)
    overhead.use_cpu_clock(args.clock == "cpu")
    device = torch.device(args.device)
    preset = overhead.PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = build_trainers(preset, device, tmp, args.warmup + args.steps)
        times = time_trainer_steps(trainers, overhead.batch_for(preset, device), device, args.steps, args.warmup)
    median = {n: statistics.median(t) for n, t in times.items()}
    plain = median["plain_lora"]
    result = {
        "preset": args.preset,
        "shape": preset,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "clock": args.clock,
        "targets": TARGETS,
        "step_seconds_median": median,
        "step_seconds_mean": {n: statistics.fmean(t) for n, t in times.items()},
        "step_ratio": {n: m / plain for n, m in median.items()},
        "step_seconds": times,
        "versions": package_versions(),
    }
    suffix = "" if args.preset == "cpu" else "_" + args.preset
    out = Path(args.out or Path(__file__).parent / "results" / f"peer_steps{suffix}.json")
    atomic_write_json(out, result)
    print(f"\n{result['device']}, preset {args.preset}, {args.clock} clock, {args.steps} interleaved steps each")
    print(f"  {'method':<12} {'median step (s)':>16} {'mean step (s)':>14} {'vs plain LoRA':>14}")
    for n in METHODS:
        print(f"  {n:<12} {median[n]:>16.4f} {result['step_seconds_mean'][n]:>14.4f} {median[n] / plain:>13.3f}x")
    print(f"JSON: {out}")
    return result


if __name__ == "__main__":
    main()
