"""Report figures (matplotlib, no pyplot): drift bars, task/refusal Pareto scatter, per-category heat map,
Fisher spectrum, chosen m per module and the forgetting scaling law (docs/design.md §5, §8).

Every function takes plain Python data (no run-folder knowledge) and returns a `matplotlib.figure.Figure`.
Figures are built with `Figure()` directly instead of `pyplot`: no global state, no GUI backend, no window can
ever open, and nothing leaks between calls (pyplot keeps every figure alive until `close`).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from .compare_table import natural_key

# One colour per series, the same across every plot of a report (Okabe-Ito: readable by colour-blind readers).
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save `fig` as PNG atomically (temporary file in the same folder, then `os.replace`).

    Args:
        fig (`Figure`): The figure.
        path (`str` or `os.PathLike`): Destination `.png` file; its folder is created.
        dpi (`int`, defaults to 110): Resolution.

    Returns:
        `Path`: the written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        # mkstemp files are 0600; a report is meant to be shared, so give it plain-open permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Labels of the non-dominated points when both coordinates are to be maximised.

    A point is dominated when another point is at least as good on both axes and strictly better on one.
    Identical points do not dominate each other, so both stay on the front.

    Args:
        points (`Sequence[tuple[str, float, float]]`): `(label, x, y)`; here x = task metric, y = refusal rate.

    Returns:
        `list[str]`: the front's labels ordered by increasing x (then decreasing y), ready to draw as a line.
    """
    clean = [(lab, float(x), float(y)) for lab, x, y in points if _finite(x) and _finite(y)]
    front = []
    for lab, x, y in clean:
        dominated = any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for _, x2, y2 in clean)
        if not dominated:
            front.append((x, -y, lab))
    return [lab for _, _, lab in sorted(front)]


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _err(value, lo, hi):
    # matplotlib wants non-negative distances; a CI that misses its point estimate (possible for a
    # percentile bootstrap of a ratio) would otherwise raise, so clip to 0.
    if not (_finite(value) and _finite(lo) and _finite(hi)):
        return 0.0, 0.0
    return max(value - lo, 0.0), max(hi - value, 0.0)


def plot_drift(bars: Mapping[str, Sequence[tuple[str, float, float | None, float | None]]]) -> Figure:
    """Drift (RA_base - RA_method, percentage points) per method, one bar per seed with its 95% CI.

    Args:
        bars (`Mapping[str, Sequence[tuple]]`): method -> `[(seed_label, drift, ci_low, ci_high), ...]`,
            drift as a fraction (plotted x100).
    """
    methods = list(bars)
    seeds = sorted({s for rows in bars.values() for s, *_ in rows}, key=natural_key)
    fig = Figure(figsize=(max(5.0, 0.9 * len(methods) + 2), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / max(len(seeds), 1)
    for j, seed in enumerate(seeds):
        xs, ys, errs = [], [], [[], []]
        for i, m in enumerate(methods):
            for s, v, lo, hi in bars[m]:
                if s == seed and _finite(v):
                    xs.append(i + (j - (len(seeds) - 1) / 2) * width)
                    ys.append(100 * v)
                    e = _err(v, lo, hi)
                    errs[0].append(100 * e[0])
                    errs[1].append(100 * e[1])
        ax.bar(xs, ys, width * 0.95, yerr=errs, capsize=3, label=f"seed {seed}", color=PALETTE[j % len(PALETTE)])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel("drift (pts, lower is better)")
    ax.set_title("Refusal drift vs the aligned model (95% bootstrap CI)")
    if len(seeds) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_pareto(
    points: Sequence[tuple[str, float, float]], base: tuple[float, float] | None = None, front=None
) -> Figure:
    """Task metric vs refusal rate, one point per method (or lambda row), Pareto front drawn and labelled.

    Args:
        points (`Sequence[tuple[str, float, float]]`): `(label, task_metric, refusal_rate)` as fractions.
        base (`tuple[float, float]`, *optional*): The aligned model before fine-tuning, drawn as a reference star
            (not part of the front: it is the starting point, not a competing method).
        front (`list[str]`, *optional*): Precomputed `pareto_front(points)`.
    """
    front = pareto_front(points) if front is None else front
    fig = Figure(figsize=(6.0, 4.4))
    ax = fig.add_subplot()
    by_label = {lab: (x, y) for lab, x, y in points if _finite(x) and _finite(y)}
    for i, (lab, (x, y)) in enumerate(by_label.items()):
        on = lab in front
        ax.scatter(
            [100 * x],
            [100 * y],
            s=70 if on else 40,
            color=PALETTE[i % len(PALETTE)],
            edgecolors="black" if on else "none",
            linewidths=1.2,
            zorder=3,
        )
        ax.annotate(
            lab + (" *" if on else ""), (100 * x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    if len(front) > 1:
        ax.plot(
            [100 * by_label[lab][0] for lab in front],
            [100 * by_label[lab][1] for lab in front],
            "k--",
            lw=1,
            label="Pareto front (*)",
            zorder=2,
        )
    elif front:
        ax.plot([], [], "k--", lw=1, label="Pareto front (*)")
    if base is not None and _finite(base[0]) and _finite(base[1]):
        ax.scatter([100 * base[0]], [100 * base[1]], marker="*", s=160, color="grey", label="aligned model", zorder=3)
    ax.set_xlabel("task metric (%, higher is better)")
    ax.set_ylabel("refusal rate on unsafe prompts (%, higher is better)")
    ax.set_title("Task metric vs refusal rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_category_heatmap(rows: Mapping[str, Mapping[str, float]]) -> Figure:
    """Per-category refusal rate, rows = models/methods, columns = categories, cells annotated in %.

    Args:
        rows (`Mapping[str, Mapping[str, float]]`): row label -> {category: refusal rate (fraction)}.
    """
    labels = list(rows)
    cats = sorted({c for r in rows.values() for c in r})
    data = np.full((len(labels), len(cats)), np.nan)
    for i, lab in enumerate(labels):
        for j, c in enumerate(cats):
            v = rows[lab].get(c)
            if _finite(v):
                data[i, j] = 100 * v
    fig = Figure(figsize=(max(5.0, 0.8 * len(cats) + 3), max(2.5, 0.45 * len(labels) + 1.6)))
    ax = fig.add_subplot()
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=35, ha="right")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    for i in range(len(labels)):
        for j in range(len(cats)):
            v = data[i, j]
            text = "n/a" if np.isnan(v) else f"{v:.0f}"
            # Light text on the dark (low) end of viridis, dark text on the bright end and on empty (white) cells.
            ax.text(
                j, i, text, ha="center", va="center", fontsize=7, color="black" if np.isnan(v) or v >= 60 else "white"
            )
    fig.colorbar(im, ax=ax, label="refusal rate (%)")
    ax.set_title("Refusal rate per harm category")
    return fig


def plot_fisher_spectrum(
    spectra: Mapping[str, Sequence[float]],
    chosen_m: Mapping[str, int] | None = None,
    traces: Mapping[str, float] | None = None,
) -> Figure:
    """Eigenvalues of a few modules' Fisher factors, each divided by its trace (fraction of energy), log-y.

    Args:
        spectra (`Mapping[str, Sequence[float]]`): module -> eigenvalues (any order, any scale).
        chosen_m (`Mapping[str, int]`, *optional*): module -> chosen subspace size m, marked on its curve.
        traces (`Mapping[str, float]`, *optional*): module -> full trace, for spectra that hold only the top
            eigenvalues (sketched factors); a full spectrum is divided by its own sum.
    """
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    for i, (name, vals) in enumerate(spectra.items()):
        ev = np.sort(np.clip(np.asarray(vals, dtype=float), 0, None))[::-1]
        total = (traces or {}).get(name) or ev.sum()
        if total <= 0 or len(ev) == 0:
            continue
        # Floor at a tiny value so exact zeros (rank-deficient factors) stay on the log axis.
        ev = np.maximum(ev / total, 1e-12)
        k = np.arange(1, len(ev) + 1)
        color = PALETTE[i % len(PALETTE)]
        ax.plot(k, ev, color=color, lw=1.4, label=_short(name))
        m = (chosen_m or {}).get(name)
        if m and 1 <= m <= len(ev):
            ax.plot([m], [ev[m - 1]], "o", color=color, ms=6, mec="black")
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("eigenvalue index k")
    ax.set_ylabel("lambda_k / trace")
    ax.set_title("Fisher spectrum (dots: chosen m)" if chosen_m else "Fisher spectrum")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def plot_subspace_m(modules: Mapping[str, Mapping[str, float]]) -> Figure:
    """Chosen subspace size m per module (bars, coloured by projection type) and its captured energy (line).

    Args:
        modules (`Mapping[str, Mapping]`): module -> {"m": int, "energy": float (optional), "d_out": int (optional)},
            in module order.
    """
    names = list(modules)
    kinds = [n.rsplit(".", 1)[-1] for n in names]
    kind_order = list(dict.fromkeys(kinds))
    fig = Figure(figsize=(max(6.0, 0.18 * len(names) + 3), 3.8))
    ax = fig.add_subplot()
    xs = np.arange(len(names))
    for ki, kind in enumerate(kind_order):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        ax.bar(idx, [modules[names[i]]["m"] for i in idx], color=PALETTE[ki % len(PALETTE)], label=kind)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("module index (by layer)")
    ax.set_ylabel("chosen m")
    ax.set_title("Alignment subspace size per module")
    energies = [modules[n].get("energy") for n in names]
    if any(_finite(e) for e in energies):
        ax2 = ax.twinx()
        ax2.plot(xs, [100 * e if _finite(e) else np.nan for e in energies], "k.-", lw=0.8, ms=3, label="energy")
        ax2.set_ylabel("energy captured (%)")
        ax2.set_ylim(0, 105)
    # Below the axes: inside, the legend would hide the bars of the first modules.
    ax.legend(fontsize=7, ncol=min(len(kind_order), 7), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_scaling(methods: Mapping[str, Mapping], x_key: str = "steps") -> Figure:
    """Alignment loss vs fine-tuning length per method with the fitted L(D) = L0 + A * D^beta, log-x.

    Args:
        methods (`Mapping[str, Mapping]`): the `"methods"` block of a scaling-1 `scaling.json`.
        x_key (`str`, defaults to `"steps"`): which point field is D (`"steps"` or `"tokens"`).
    """
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    for i, (name, block) in enumerate(methods.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = [p for p in block.get("points", []) if _finite(p.get(x_key)) and _finite(p.get("alignment_loss"))]
        pts = [p for p in pts if p[x_key] > 0]
        if pts:
            ax.plot([p[x_key] for p in pts], [p["alignment_loss"] for p in pts], "o", color=color, label=name)
        fit = block.get("fit")
        if fit and pts and all(_finite(fit.get(k)) for k in ("L0", "A", "beta")):
            lo, hi = min(p[x_key] for p in pts), max(p[x_key] for p in pts)
            d = np.geomspace(lo, hi, 100) if hi > lo else np.array([lo])
            ax.plot(
                d,
                scaling_curve(d, fit),
                "-",
                color=color,
                lw=1.2,
                label=f"{name} fit: A={fit['A']:.3g}, beta={fit['beta']:.3g}",
            )
    ax.set_xscale("log")
    # Plain numbers (20, 40, 80) instead of 2x10^1 on the minor ticks of a short log range.
    ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    ax.set_xlabel(f"fine-tuning length D ({x_key})")
    ax.set_ylabel("alignment loss (NLL of refusals)")
    ax.set_title("Forgetting scaling law L(D) = L0 + A D^beta")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def scaling_curve(d, fit: Mapping[str, float]):
    """L(D) = L0 + A * D^beta for an array of D."""
    return fit["L0"] + fit["A"] * np.power(np.asarray(d, dtype=float), fit["beta"])


def scaling_x_key(methods: dict) -> str:
    """Which point field (`"steps"` or `"tokens"`) a scaling-1 fit was made on.

    The schema does not record it (`alignguard scaling` fits on steps), so pick the field whose fitted curve
    reproduces the points best; ties go to steps.

    Args:
        methods (`dict`): the `"methods"` block of a scaling-1 `scaling.json`.

    Returns:
        `str`: `"steps"` or `"tokens"`.
    """
    sse = {"steps": 0.0, "tokens": 0.0}
    for block in methods.values():
        fit = block.get("fit")
        if not fit or not all(_finite(fit.get(k)) for k in ("L0", "A", "beta")):
            continue
        for key in sse:
            pts = [p for p in block.get("points", []) if _finite(p.get(key)) and _finite(p.get("alignment_loss"))]
            pts = [p for p in pts if p[key] > 0]
            pred = scaling_curve([p[key] for p in pts], fit)
            sse[key] += float(sum((p["alignment_loss"] - q) ** 2 for p, q in zip(pts, pred)))
    return min(sse, key=lambda k: (sse[k], k != "steps"))


def _short(name: str) -> str:
    # "model.layers.12.self_attn.q_proj" -> "L12.q_proj": legends stay readable for 30-layer models.
    m = re.search(r"layers?\.(\d+)\.(?:.*\.)?([^.]+)$", name)
    return f"L{m.group(1)}.{m.group(2)}" if m else name


__all__ = [
    "PALETTE",
    "natural_key",
    "pareto_front",
    "plot_category_heatmap",
    "plot_drift",
    "plot_fisher_spectrum",
    "plot_pareto",
    "plot_scaling",
    "plot_subspace_m",
    "save_figure",
    "scaling_curve",
    "scaling_x_key",
]
