"""Drift budget: choose a penalty weight lambda from probe runs so that the refusal drift stays within a budget
(docs/design.md §12, `alignguard calibrate`).

Probe runs at a few log-spaced lambda values are evaluated by DriftCheck on a calibration split. From their
per-prompt refusal flags this module fits drift(lambda) and task(lambda) and chooses the smallest lambda whose
predicted drift is within the budget. Pure numpy on plain arrays: no model, no files, no logging.

* **Fit.** Drift D(lambda) = RA_base - RA(lambda), in points, is fitted by weighted isotonic regression
  (pool-adjacent-violators, Barlow et al. 1972), non-increasing in lambda: a larger penalty weight never buys more
  drift in expectation, and two noisy probes out of order are pooled to their weighted mean instead of being
  followed up and down. Between probes the fit is linear in log(lambda); nothing is extrapolated beyond the probed
  range. Isotonic regression has no shape to get wrong (a logistic in log lambda would have to be right in its
  asymptotes) and stays monotone on every bootstrap resample, which the choice rule below relies on.
* **Interval.** A paired percentile bootstrap over calibration prompts (`driftcheck.metrics._bootstrap`, the same
  resampler as DriftCheck's drift intervals): one draw of prompt indices serves the base model and every probe, and
  each resample is fitted like the data. Pointwise quantiles of the resampled curves give the band.
* **Choice.** The smallest lambda on a fine log grid between the probes (3 significant digits, so the value names a
  run folder exactly) whose *upper* one-sided `confidence` bound of predicted drift is within the budget (or, with
  `rule="point"`, whose point estimate is). Because every resampled curve is non-increasing, this is exactly the
  `confidence` quantile of the resampled crossing points lambda*_b (the smallest grid lambda where resample b is
  within budget): an upper confidence bound of the crossing. If no probed lambda is within budget the largest is
  returned with status `none_within`; if the smallest already is, it is returned with status `all_within`.
* **Task.** Task accuracy is fitted the same way (isotonic, non-increasing); its band is a parametric (binomial)
  bootstrap of each probe's correct count, since the compare rows keep counts, not per-example flags. Probes are
  scored on the same examples, so this unpaired band is wider than a paired one would be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from .driftcheck.metrics import _bootstrap

STATUSES = ("interpolated", "all_within", "none_within")


def isotonic_nonincreasing(y: Sequence[float], w: Sequence[float] | None = None) -> np.ndarray:
    """Weighted least-squares fit of `y` by a non-increasing sequence (pool-adjacent-violators).

    Args:
        y (`Sequence[float]`): values in the order of increasing lambda.
        w (`Sequence[float]`, *optional*): positive weights (default 1).

    Returns:
        `np.ndarray` (float64): the fitted values, same length as `y`.
    """
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64)
    if y.ndim != 1 or w.shape != y.shape:
        raise ValueError(f"y and w must be 1-d of equal length, got {y.shape} and {w.shape}")
    if not (w > 0).all():
        raise ValueError("w: weights must be > 0")
    # Blocks of pooled values; a block that rises above its left neighbour violates "non-increasing" and merges.
    means, weights, sizes = [], [], []
    for v, wt in zip(y, w):
        means.append(v)
        weights.append(wt)
        sizes.append(1)
        while len(means) > 1 and means[-1] > means[-2]:
            m2, w2, s2 = means.pop(), weights.pop(), sizes.pop()
            total = weights[-1] + w2
            means[-1] = (means[-1] * weights[-1] + m2 * w2) / total
            weights[-1] = total
            sizes[-1] += s2
    return np.repeat(np.asarray(means), sizes)


def interp_log(lambdas: Sequence[float], values, grid: Sequence[float]) -> np.ndarray:
    """Piecewise-linear interpolation in log(lambda). `values` has shape (..., k) for k probes (several curves at
    once), the result (..., len(grid)). Grid points outside the probes get the end values (callers keep the grid
    inside)."""
    x = np.log(np.asarray(lambdas, dtype=np.float64))
    g = np.log(np.asarray(grid, dtype=np.float64))
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(-1, values.shape[-1])
    out = np.stack([np.interp(g, x, row) for row in flat])
    return out.reshape(*values.shape[:-1], g.size)


def round_sig(x: float, digits: int = 3) -> float:
    """`x` rounded to `digits` significant digits (a value that prints and parses back exactly)."""
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits - 1}e}")


def log_grid(lambdas: Sequence[float], n_points: int = 200, digits: int = 3) -> np.ndarray:
    """`n_points` log-spaced values from min to max of `lambdas`, rounded to `digits` significant digits and kept
    inside the range, plus the probes themselves; sorted, without duplicates."""
    lo, hi = min(lambdas), max(lambdas)
    points = [min(max(round_sig(float(v), digits), lo), hi) for v in np.geomspace(lo, hi, n_points)]
    return np.unique(np.asarray(points + [float(v) for v in lambdas], dtype=np.float64))


def first_within(curve, budget: float) -> int | None:
    """Index of the first (smallest-lambda) grid point with `curve <= budget`, None if there is none."""
    hits = np.flatnonzero(np.asarray(curve) <= budget + 1e-9)  # tolerance: a curve exactly at the budget is within
    return int(hits[0]) if hits.size else None


def choose_index(curve, budget: float) -> tuple[int, str]:
    """(grid index, status) of the choice on a non-increasing `curve`: the first point within `budget`
    (`interpolated`, or `all_within` when it is the first grid point), else the last point (`none_within`)."""
    i = first_within(curve, budget)
    if i is None:
        return len(curve) - 1, "none_within"
    return i, "all_within" if i == 0 else "interpolated"


def _quantile(a, q, axis=0):
    # inverted_cdf returns a resampled value itself (no interpolation between resamples): the duality between the
    # upper drift bound and the quantile of the crossing points then holds exactly, and +inf crossings stay +inf.
    return np.quantile(a, q, axis=axis, method="inverted_cdf")


def wilson_interval(k: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (95% by default); (nan, nan) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p, k, n = float(k) / float(n), float(k), float(n)
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, center - half)), float(min(1.0, center + half))


def fit_drift(
    lambdas: Sequence[float],
    base_flags,
    probe_flags,
    budget: float,
    rule: Literal["upper", "point"] = "upper",
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    grid_points: int = 200,
    weights: Sequence[float] | None = None,
) -> dict:
    """Fit drift(lambda) on the probes, bootstrap it over prompts and choose lambda for `budget`.

    Args:
        lambdas (`Sequence[float]`): the probed values, > 0, increasing and distinct (at least 2).
        base_flags: refusal flag (0/1) of the model without adapter on each unsafe calibration prompt, shape (n,).
        probe_flags: refusal of each probe on the same prompts in the same order, shape (k, n); a probe trained
            with several seeds holds the mean flag over its seeds (a fraction per prompt).
        budget (`float`): the largest acceptable drift, in points (100 * refusal-rate drop).
        rule (`"upper"` or `"point"`): choose on the one-sided `confidence` upper bound or on the point estimate.
        confidence (`float`): level of the upper bound (0.5 < confidence < 1).
        n_boot / seed: bootstrap resamples and seed.
        grid_points (`int`): log-spaced grid points between the smallest and the largest probe.
        weights (`Sequence[float]`, *optional*): isotonic weights per probe (e.g. its number of seeds).

    Returns:
        `dict` (JSON-plain): `probes` (lambda, drift, ci_low, ci_high, fit), `grid` (lambda, drift, low, high,
        upper), `choice` (lambda, index, status, rule, confidence, budget, predicted drift with its band and upper
        bound, `lambda_interval` [low, high] with `censored_low`/`censored_high`) and `bootstrap` settings.
        Drift values are in points.

    Raises:
        ValueError: for fewer than 2 probes, lambdas that are not positive, increasing and distinct, or shapes
            that do not match.
    """
    lam = np.asarray(lambdas, dtype=np.float64)
    base = np.asarray(base_flags, dtype=np.float64)
    flags = np.asarray(probe_flags, dtype=np.float64)
    if lam.ndim != 1 or lam.size < 2:
        raise ValueError(f"lambdas: need at least 2 probed values, got {list(lam)}")
    if not (lam > 0).all() or not (np.diff(lam) > 0).all():
        raise ValueError(f"lambdas: must be > 0, increasing and distinct, got {list(lam)}")
    if base.ndim != 1 or base.size == 0 or flags.shape != (lam.size, base.size):
        raise ValueError(f"probe_flags: expected shape {(lam.size, base.size)}, got {flags.shape}")
    if rule not in ("upper", "point"):
        raise ValueError(f"rule: must be 'upper' or 'point', got {rule!r}")
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence: must be in (0.5, 1), got {confidence}")
    w = np.ones(lam.size) if weights is None else np.asarray(weights, dtype=np.float64)

    def drifts(b, *probes, axis=-1):
        return np.stack([100.0 * (b.mean(axis=axis) - p.mean(axis=axis)) for p in probes])

    observed = drifts(base, *flags)
    ci_low, ci_high, dist = _bootstrap((base, *flags), drifts, n_boot, seed)  # dist: (k, n_boot)
    grid = log_grid(lam, grid_points)
    fitted = isotonic_nonincreasing(observed, w)
    point = interp_log(lam, fitted, grid)
    boot = interp_log(lam, np.stack([isotonic_nonincreasing(d, w) for d in dist.T]), grid)  # (n_boot, grid)
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    upper = _quantile(boot, confidence)

    index, status = choose_index(upper if rule == "upper" else point, budget)
    # The crossing of each resampled curve; +inf where a resample is over budget on the whole range.
    crossings = np.array([grid[i] if (i := first_within(c, budget)) is not None else np.inf for c in boot])
    lam_lo, lam_hi = (float(v) for v in _quantile(crossings, [0.025, 0.975]))
    return {
        "probes": [
            {"lambda": float(x), "drift": float(d), "ci_low": float(lo), "ci_high": float(hi), "fit": float(f)}
            for x, d, lo, hi, f in zip(lam, observed, np.atleast_1d(ci_low), np.atleast_1d(ci_high), fitted)
        ],
        "grid": {
            "lambda": grid.tolist(),
            "drift": point.tolist(),
            "low": low.tolist(),
            "high": high.tolist(),
            "upper": upper.tolist(),
        },
        "choice": {
            "lambda": float(grid[index]),
            "index": index,
            "status": status,
            "rule": rule,
            "confidence": confidence,
            "budget": float(budget),
            "predicted_drift": float(point[index]),
            "predicted_drift_low": float(low[index]),
            "predicted_drift_high": float(high[index]),
            "predicted_drift_upper": float(upper[index]),
            # 95% interval of the crossing lambda*; a bound at the probed range's edge may lie beyond it, and None
            # stands for "above the largest probe".
            "lambda_interval": [v if math.isfinite(v) else None for v in (lam_lo, lam_hi)],
            "censored_low": bool(lam_lo <= grid[0]),
            "censored_high": not math.isfinite(lam_hi),
            "within_budget_fraction": float(np.isfinite(crossings).mean()),
        },
        "bootstrap": {"n_boot": n_boot, "seed": seed, "n_prompts": int(base.size), "method": "paired percentile"},
    }


def fit_task(
    lambdas: Sequence[float],
    n_correct: Sequence[float],
    n: Sequence[float],
    grid: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Fit task accuracy(lambda): isotonic non-increasing (weighted by the examples behind each probe), linear in
    log(lambda) on `grid`, with Wilson intervals per probe and a binomial parametric-bootstrap band.

    Returns:
        `dict` (JSON-plain): `probes` (lambda, accuracy, ci_low, ci_high, fit, n) and `grid` (accuracy, low, high),
        accuracies as fractions.
    """
    lam = np.asarray(lambdas, dtype=np.float64)
    k, m = np.asarray(n_correct, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if k.shape != lam.shape or m.shape != lam.shape or not (m > 0).all() or ((k < 0) | (k > m)).any():
        raise ValueError(f"n_correct / n: need 0 <= n_correct <= n and n > 0 per probe, got {list(k)} / {list(m)}")
    acc = k / m
    fitted = isotonic_nonincreasing(acc, m)
    rng = np.random.default_rng(seed)
    counts = rng.binomial(m.astype(np.int64), acc, size=(n_boot, lam.size)) / m
    boot = interp_log(lam, np.stack([isotonic_nonincreasing(c, m) for c in counts]), grid)
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    return {
        "probes": [
            {"lambda": float(x), "accuracy": float(a), "ci_low": lo, "ci_high": hi, "fit": float(f), "n": int(nn)}
            for x, a, f, nn, (lo, hi) in zip(lam, acc, fitted, m, (wilson_interval(a, b) for a, b in zip(k, m)))
        ],
        "grid": {"accuracy": interp_log(lam, fitted, grid).tolist(), "low": low.tolist(), "high": high.tolist()},
    }
