"""Fisher accumulator memory at 7B scale: dense d_out x d_out factors vs the streaming Nystrom sketch.

    python benchmarks/sketch_memory.py                  # ~1-2 min on a 2-core CPU
    python benchmarks/sketch_memory.py --tokens 4096    # longer gradient streams

Shape: Llama-2-7B (hidden 4096, intermediate 11008, 32 layers; q, k, v, o, gate, up, down per layer).
1. Analytic: dense = sum over modules of d_out^2 * 4 bytes; sketch = Y and Omega (d_out x k each) * 4 bytes.
2. Measured: one layer's 7 modules at a time through the real accumulator (`alignguard.fisher._Accumulator`,
   the object `estimate_fisher` feeds from its gradient hooks), fed synthetic gradient streams; we record the
   bytes of the accumulator tensors and the peak process RSS above the baseline (sampled every 2 ms), and
   extrapolate to 32 layers (every layer has the same shapes).
3. Accuracy: for one 4096-d module, the sketch's top-m eigenvectors vs the exact eigenvectors of the dense
   factor on a gradient stream with a decaying spectrum (cosines of the principal angles, eigenvalue error).
Prints a table and writes benchmarks/results/sketch_memory.json (atomically).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from alignguard.config import FisherConfig  # noqa: E402
from alignguard.fisher import _Accumulator  # noqa: E402
from alignguard.io import atomic_write_json, package_versions  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 4096, 11008, 32
# (d_out, d_in) of one Llama-2-7B decoder layer's projections.
LAYER_MODULES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
GIB = 2**30


def analytic_bytes(rank: int) -> dict[str, float]:
    """Accumulator bytes for the whole model, from the shapes alone (fp32)."""
    dense = sum(d * d * 4 for d, _ in LAYER_MODULES.values()) * LAYERS
    sketch = sum(2 * d * min(rank, d) * 4 for d, _ in LAYER_MODULES.values()) * LAYERS  # Y and Omega
    return {"dense_gib": dense / GIB, "sketch_gib": sketch / GIB, "ratio": dense / sketch}


class PeakRSS:
    """Peak resident set size (bytes) above the level at entry, sampled by a background thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(self.interval)

    def __enter__(self):
        gc.collect()
        self.base = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


def _stream(d: int, tokens: int, chunk: int, seed: int):
    """Synthetic per-token output gradients (1, chunk, d) with a decaying spectrum (memory does not depend on it)."""
    gen = torch.Generator().manual_seed(seed)
    scale = (0.97 ** torch.arange(d, dtype=torch.float32)).sqrt()
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        yield (torch.randn(1, n, d, generator=gen) * scale)


def measure_layer(mode: str, rank: int, tokens: int, chunk: int) -> dict:
    """Accumulate one layer's 7 modules in `mode` through the real accumulator; tensor bytes, peak RSS, time."""
    dims = {f"model.layers.0.{n}": dims for n, dims in LAYER_MODULES.items()}
    config = FisherConfig(fisher_storage=mode, sketch_rank=rank, show_progress=False)
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        acc = _Accumulator(dims, config, "cpu")
        acc.positions = torch.ones(1, chunk, dtype=torch.bool)
        for i, name in enumerate(dims):
            for g in _stream(dims[name][0], tokens, chunk, seed=i):
                acc.positions = torch.ones(1, g.shape[1], dtype=torch.bool)
                acc.hook_for(name)(g)
        held = sum(t.numel() * t.element_size() for t in acc.sums.values())
        held += sum(
            s.y.numel() * s.y.element_size() + s.omega.numel() * s.omega.element_size() for s in acc.sketches.values()
        )
    seconds = time.perf_counter() - t0
    del acc
    gc.collect()
    return {
        "held_bytes": held,
        "peak_rss_bytes": peak.peak,
        "seconds": seconds,
        "extrapolated_held_gib": held * LAYERS / GIB,
        # Accumulators scale with the layer count; the update workspace (peak - held) is reused, so count it once.
        "extrapolated_peak_rss_gib": (held * LAYERS + max(peak.peak - held, 0)) / GIB,
    }


def _hadamard(d: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d**0.5


def _top_eigh(mat: torch.Tensor, m: int, block: int, iters: int, seed: int = 0):
    """Top-m eigenpairs of a PSD matrix by block subspace iteration + Rayleigh-Ritz.

    A full float64 `eigh` of 4096 x 4096 takes ~100 s on a 2-core CPU; the top block converges at the rate
    (lambda_{block+1} / lambda_m)^iters, which for the spectra used here is below 1e-12 after `iters` steps.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.linalg.qr(torch.randn(mat.shape[0], block, generator=gen)).Q
    for _ in range(iters):
        x = torch.linalg.qr(mat @ x).Q
    x = x.double()
    small = x.T @ (mat.double() @ x)
    lam, w = torch.linalg.eigh((small + small.T) / 2)
    lam, w = lam.flip(0)[:m], w.flip(1)[:, :m]
    return lam, x @ w


def subspace_agreement(d: int, tokens: int, ranks: list[int], ms: list[int], decay: float, seed: int = 0) -> dict:
    """Sketch vs dense top-m subspace of one d x d factor; gradients with spectrum decay^i in a random basis."""
    gen = torch.Generator().manual_seed(seed)
    # A randomised Hadamard basis is orthogonal and costs no d x d QR (d is a power of two here).
    signs = torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1
    basis = _hadamard(d) * signs
    scale = (decay ** torch.arange(d, dtype=torch.float32)).sqrt()
    accs = {"dense": _Accumulator({"m": (d, d)}, FisherConfig(fisher_storage="dense", show_progress=False), "cpu")}
    for k in ranks:
        accs[k] = _Accumulator(
            {"m": (d, d)}, FisherConfig(fisher_storage="sketch", sketch_rank=k, show_progress=False), "cpu"
        )
    for start in range(0, tokens, 512):
        n = min(512, tokens - start)
        g = ((torch.randn(n, d, generator=gen) * scale) @ basis.T)[None]
        for acc in accs.values():
            acc.positions = torch.ones(1, n, dtype=torch.bool)
            acc.hook_for("m")(g)
    # An accumulator that keeps only the upper half-blocks while accumulating gives the whole sum via dense_sum().
    dense_acc = accs["dense"]
    dense = dense_acc.dense_sum("m") if hasattr(dense_acc, "dense_sum") else dense_acc.sums["m"]
    t0 = time.perf_counter()
    lam, vec = _top_eigh(dense, max(ms), block=2 * max(ms), iters=60)
    ref_s = time.perf_counter() - t0
    # m at 90% energy of the *population* spectrum (the sample one needs the full eigh this avoids).
    pop = decay ** torch.arange(d, dtype=torch.float64)
    energy = torch.cumsum(pop, 0) / pop.sum()
    out = {
        "d": d,
        "tokens": tokens,
        "decay": decay,
        "m_at_90pct_energy": int((energy < 0.9).sum()) + 1,
        "reference": "top eigenpairs of the dense factor (block subspace iteration, 60 steps, Rayleigh-Ritz)",
        "reference_seconds": ref_s,
        "by_rank": {},
    }
    for k in ranks:
        t0 = time.perf_counter()
        eig, u = accs[k].sketches["m"].eigh()
        row = {"sketch_eigh_seconds": time.perf_counter() - t0, "by_m": {}}
        for m in ms:
            cos = torch.linalg.svdvals(vec[:, :m].T @ u[:, :m].double())
            rel = ((eig[:m].double() - lam[:m]).abs() / lam[:m]).max()
            row["by_m"][str(m)] = {
                "min_cos": float(cos.min()),
                "mean_cos": float(cos.mean()),
                "max_rel_eig_err": float(rel),
            }
        out["by_rank"][str(k)] = row
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=256, help="sketch rank k (FisherConfig.sketch_rank default)")
    parser.add_argument("--tokens", type=int, default=1024, help="gradient tokens per module in the memory test")
    parser.add_argument("--subspace-tokens", type=int, default=4096, help="tokens in the subspace check")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sketch_memory.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    analytic = analytic_bytes(args.rank)
    # Sketch first: RSS only shrinks back when the allocator returns memory, so do the small one first.
    measured = {mode: measure_layer(mode, args.rank, args.tokens, chunk=256) for mode in ("sketch", "dense")}
    agreement = [
        subspace_agreement(HIDDEN, args.subspace_tokens, ranks, [16, 64, 128], decay)
        for decay, ranks in ((0.97, [args.rank]), (0.99, [args.rank, 2 * args.rank]))
    ]
    result = {
        "shape": {"model": "Llama-2-7B", "hidden": HIDDEN, "intermediate": INTERMEDIATE, "layers": LAYERS},
        "modules_per_layer": list(LAYER_MODULES),
        "sketch_rank": args.rank,
        "tokens_per_module": args.tokens,
        "analytic": analytic,
        "measured_one_layer": measured,
        "subspace_agreement": agreement,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "versions": package_versions(),
    }
    print(f"Llama-2-7B shape, 32 layers x 7 modules, sketch rank k={args.rank}, fp32 accumulators")
    print(f"{'':28s}{'dense':>12s}{'sketch':>12s}{'ratio':>8s}")
    print(
        f"{'analytic, 32 layers (GiB)':28s}{analytic['dense_gib']:12.2f}{analytic['sketch_gib']:12.2f}"
        f"{analytic['ratio']:8.1f}"
    )
    for key, label in (
        ("held_bytes", "held, 1 layer (MiB)"),
        ("peak_rss_bytes", "peak RSS, 1 layer (MiB)"),
    ):
        dv, sv = measured["dense"][key] / 2**20, measured["sketch"][key] / 2**20
        print(f"{label:28s}{dv:12.1f}{sv:12.1f}{dv / max(sv, 1e-9):8.1f}")
    for key, label in (
        ("extrapolated_held_gib", "held, x32 layers (GiB)"),
        ("extrapolated_peak_rss_gib", "peak RSS, x32 layers (GiB)"),
    ):
        dv, sv = measured["dense"][key], measured["sketch"][key]
        print(f"{label:28s}{dv:12.2f}{sv:12.2f}{dv / max(sv, 1e-9):8.1f}")
    print(f"{'accumulate 1 layer (s)':28s}{measured['dense']['seconds']:12.1f}{measured['sketch']['seconds']:12.1f}")
    for agr in agreement:
        print(
            f"\nsubspace vs dense, d={agr['d']}, {agr['tokens']} tokens, spectrum {agr['decay']}^i "
            f"(m at 90% energy = {agr['m_at_90pct_energy']}):"
        )
        for k, row in agr["by_rank"].items():
            for m, v in row["by_m"].items():
                print(
                    f"  k={k:>4s} top-{m:>3s}: min cos {v['min_cos']:.5f}  mean cos {v['mean_cos']:.5f}  "
                    f"max rel eigenvalue err {v['max_rel_eig_err']:.2e}"
                )
    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
