"""How AlignGuard's step overhead and the Fisher pass cost change with model size and tokens per step.

    python benchmarks/growth.py             # CPU sweep, ~15 min on 2 cores: the cpu preset, the SmolLM2-135M
                                            # and the TinyLlama-1.1B shapes, each at 2 tokens-per-step values
    python benchmarks/growth.py --quick     # the cpu preset only, fewer repeats (about a minute)
    python benchmarks/growth.py --sizes cpu smollm2-135m

Random weights from a LlamaConfig (benchmarks/overhead.py PRESETS; nothing is downloaded), float32 on the CPU.
For every size and tokens-per-step value it reports, each as a ratio against a baseline in the same run:
- step ratio: (forward + backward + AdamW + all AlignGuard terms) / (the same without the terms), on one model
  (the regulariser is left out of the plain step's loss), the two interleaved pair by pair; the median of the
  per-pair ratios, with their min-max as the noise;
- Fisher ratio: Fisher-pass tokens/s / plain forward+backward tokens/s on the same batches (dense factors and
  the Nystrom sketch), interleaved, per repeat; what an estimation costs once whatever its number of batches
  (allocation, weight fingerprints, normalisation; FIXED_COSTS), amortised over a real data set, is timed
  apart and left out of the pass (the JSON keeps the ratio with it too).
The regulariser costs O(sum_l m_l * r * d_l) per step, independent of the tokens, so its overhead (ratio - 1)
should fall roughly as 1/tokens: the table's last column compares the measured overhead (ratio - 1) with the
regulariser's forward+backward timed alone divided by the plain step, and "AG - plain s" should stay flat.
Writes benchmarks/results/growth.json (atomically); benchmarks/README.md records a run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead  # noqa: E402  (benchmarks/overhead.py: model builder, batches and the timing loops)

from alignguard import FisherConfig  # noqa: E402  (overhead put src/ on the path)
from alignguard import fisher as fisher_module  # noqa: E402
from alignguard.accumulator import FactorAccumulator  # noqa: E402
from alignguard.io import atomic_write_json, package_versions  # noqa: E402

# Per size: the overhead.py preset, (batch, seq) per tokens-per-step value, timed steps / warm-up steps, Fisher
# batches per pass and interleaved repeats, whether dense factors fit (the 1.1B shape's dense factors take
# 6.5 GB, so it is sketched only), and the sketch rank (the sketch's end-of-pass SVDs grow with it).
SIZES = {
    "cpu": dict(
        preset="cpu", tokens=[(1, 256), (4, 256)], steps=10, warmup=2, fisher_batches=2, repeats=3, dense=True,
        sketch_rank=256,
    ),
    "smollm2-135m": dict(
        preset="smollm2-135m", tokens=[(1, 128), (4, 128)], steps=3, warmup=1, fisher_batches=1, repeats=3,
        dense=True, sketch_rank=128,
    ),
    "tinyllama-1.1b": dict(
        preset="1b", tokens=[(1, 32), (4, 32)], steps=2, warmup=1, fisher_batches=1, repeats=2, dense=False,
        sketch_rank=64,
    ),
}  # fmt: skip
QUICK = {"cpu": dict(SIZES["cpu"], steps=4, warmup=1, fisher_batches=1, repeats=2)}


# What `estimate_fisher` spends once per estimation, whatever the number of batches: allocating the sums and
# sketches (a QR per sketch), the fingerprints (a float64 pass over every base weight), the end-of-pass
# normalisation (division / sketch eigh), package versions. Amortised over a real data set; timed apart here.
FIXED_COSTS = [
    (FactorAccumulator, "allocate"),
    (FactorAccumulator, "normalised"),
    (fisher_module, "base_weights_fingerprint"),
    (fisher_module, "architecture_fingerprint"),
    (fisher_module, "architecture_shapes"),
    (fisher_module, "package_versions"),
]


@contextlib.contextmanager
def timed_fixed_costs(seconds: list[float]):
    """Time the per-estimation costs of FIXED_COSTS into `seconds` (benchmark-side wrappers; no result changes)."""
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr in FIXED_COSTS if hasattr(owner, attr)]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = overhead.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds.append(overhead.clock() - t0)

        return wrapper

    for owner, attr, fn in originals:
        setattr(owner, attr, timed(fn))
    try:
        yield
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)


def fisher_ratio(model, batches, config, device, repeats) -> dict:
    """Interleaved Fisher pass vs forward+backward on `batches`; the per-estimation costs are timed apart."""
    fixed: list[float] = []
    with timed_fixed_costs(fixed):
        seconds, tokens = overhead.time_fisher_vs_fwd_bwd(model, batches, config, device, repeats)
    # The warm-up estimation paid them too (on one batch; they do not depend on the number of batches). Each
    # repeat's pass loses its own fixed costs, not their mean over all estimations: the warm-up's are the
    # largest (first calls), and subtracting a mean inflated by them could leave a pass with negative time.
    n_est = repeats + 1
    if fixed and len(fixed) % n_est == 0:
        k = len(fixed) // n_est
        own = [sum(fixed[i * k : (i + 1) * k]) for i in range(n_est)][1:]
    else:  # calls that do not split evenly over the estimations: their mean
        own = [sum(fixed) / n_est] * repeats
    per_estimation = statistics.median(own)
    passes = [f - c for f, c in zip(seconds["fisher"], own)]
    ratios = [b / f for b, f in zip(seconds["fwd_bwd"], passes)]
    return {
        "ratio": statistics.median(ratios),
        "ratio_per_repeat": ratios,
        "ratio_with_fixed_costs": statistics.median(b / f for b, f in zip(seconds["fwd_bwd"], seconds["fisher"])),
        "fisher_pass_s": passes,
        "fwd_bwd_s": seconds["fwd_bwd"],
        "per_estimation_fixed_s": per_estimation,
        "tokens": tokens,
    }


def run_size(name: str, spec: dict, device, presets=None) -> list[dict]:
    """Rows of the sweep for one size: one per tokens-per-step value (see the module docstring)."""
    base = dict((presets or overhead.PRESETS)[spec["preset"]], dtype="float32")
    first = dict(base, batch=spec["tokens"][0][0], seq=spec["tokens"][0][1])
    model = overhead.build(first, device)
    n_params = sum(p.numel() for p in model.parameters())
    # The regulariser's subspaces come from the smallest batch (sketched where dense factors do not fit).
    storage = {"fisher_storage": "dense"} if spec["dense"] else {"fisher_storage": "sketch"}
    reg_config = FisherConfig(show_progress=False, sketch_rank=spec["sketch_rank"], **storage)
    _state, subspaces, reg = overhead.make_regularizer(model, first, device, fisher_config=reg_config)
    mean_m = statistics.mean(s.m for s in subspaces.subspaces.values())
    rows = []
    for batch_size, seq in spec["tokens"]:
        shape = dict(base, batch=batch_size, seq=seq)
        batch = overhead.batch_for(shape, device)
        times = overhead.time_steps(model, model, reg, batch, device, spec["steps"], spec["warmup"])
        pair_ratios = [a / p for a, p in zip(times["alignguard"], times["plain"])]
        reg_s = overhead.time_regulariser(reg, model, device, max(3, spec["steps"]))
        plain_s = statistics.median(times["plain"])
        row = {
            "size": name,
            "preset": spec["preset"],
            "params": n_params,
            "n_modules": reg.n_modules,
            "mean_m": mean_m,
            "batch": batch_size,
            "seq": seq,
            "tokens": batch_size * seq,
            "plain_step_s": plain_s,
            "alignguard_step_s": statistics.median(times["alignguard"]),
            "step_ratio": statistics.median(pair_ratios),
            "step_ratio_per_pair": pair_ratios,
            "regulariser_s": reg_s,
            "fisher": {},
        }
        fisher_batches = [overhead.batch_for(shape, device, seed=100 + s) for s in range(spec["fisher_batches"])]
        kinds = ["dense", "sketch"] if spec["dense"] else ["sketch"]
        for kind in kinds:
            config = FisherConfig(show_progress=False, fisher_storage=kind, sketch_rank=spec["sketch_rank"])
            row["fisher"][kind] = fisher_ratio(model, fisher_batches, config, device, spec["repeats"])
        rows.append(row)
        print(format_table([row], header=False), end="", flush=True)
    # The overhead the regulariser's own cost predicts: its forward+backward timed alone / the plain step.
    for row in rows:
        row["overhead_predicted"] = row["regulariser_s"] / row["plain_step_s"]
    del model, reg, subspaces
    return rows


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


COLUMNS = [
    ("size", "{size}"),
    ("params", "{params_m:.0f}M"),
    ("tokens/step", "{batch}x{seq}={tokens}"),
    ("plain step s", "{plain_step_s:.3f}"),
    ("AG step s", "{alignguard_step_s:.3f}"),
    ("step ratio (pairs min-max)", "{step_ratio:.3f} ({step_spread})"),
    ("AG - plain s", "{extra_s:+.3f}"),
    ("reg alone s", "{regulariser_s:.4f}"),
    ("Fisher dense (min-max)", "{fisher_dense}"),
    ("Fisher sketch (min-max)", "{fisher_sketch}"),
    ("overhead meas. / reg-alone pred.", "{overhead:+.3f} / {predicted}"),
]


def format_table(rows: list[dict], header: bool = True) -> str:
    """A Markdown table of sweep rows (the same text goes to stdout and benchmarks/README.md)."""

    def fisher_cell(row, kind):
        f = row["fisher"].get(kind)
        return "n/a" if f is None else f"{f['ratio']:.2f} ({_spread(f['ratio_per_repeat'])})"

    lines = []
    if header:
        lines.append("| " + " | ".join(c[0] for c in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        pred = row.get("overhead_predicted")
        values = dict(
            row,
            params_m=row["params"] / 1e6,
            step_spread=_spread(row["step_ratio_per_pair"]),
            fisher_dense=fisher_cell(row, "dense"),
            fisher_sketch=fisher_cell(row, "sketch"),
            overhead=row["step_ratio"] - 1,
            extra_s=row["alignguard_step_s"] - row["plain_step_s"],
            predicted="-" if pred is None else f"{pred:+.3f}",
        )
        lines.append("| " + " | ".join(fmt.format(**values) for _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def sweep(sizes: dict, device, presets=None) -> list[dict]:
    rows = []
    for name, spec in sizes.items():
        t0 = time.perf_counter()
        rows.extend(run_size(name, spec, device, presets))
        print(f"  [{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="The cpu preset only, fewer repeats (a minute).")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="Run only these sizes.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's). On a machine other jobs share, 1 is far steadier: OpenMP threads "
        "that get descheduled stall each other (a 2-thread step measured 3-10x slower than a 1-thread one).",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1 it ignores time spent descheduled "
        "while other jobs run, so ratios stay steady on a shared machine).",
    )
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/growth[_quick].json)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else SIZES
    if args.sizes:
        sizes = {n: (QUICK.get(n) if args.quick else None) or SIZES[n] for n in args.sizes}
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    overhead.use_cpu_clock(args.clock == "cpu")
    load_start, t0 = os.getloadavg(), time.perf_counter()
    rows = sweep(sizes, device)
    table = format_table(rows)
    machine = f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name()
    result = {
        "command": "python benchmarks/growth.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": machine,
        "clock": args.clock,
        "loadavg_1_5_15_start": load_start,
        "loadavg_1_5_15_end": os.getloadavg(),
        "wall_s": time.perf_counter() - t0,
        "sizes": sizes,
        "rows": rows,
        "table": table,
        "versions": package_versions(),
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"growth{'_quick' if args.quick else ''}.json")
    atomic_write_json(out, result)
    print(
        f"\n{machine}, {args.clock} clock; load average at start {load_start[0]:.2f}, at end {result['loadavg_1_5_15_end'][0]:.2f}\n"
    )
    print(table)
    print(f"JSON: {out}")
    return result


if __name__ == "__main__":
    main()
