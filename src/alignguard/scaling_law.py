"""Forgetting scaling law: a robust fit of L(D) = L0 + A * D**beta (docs/design.md §8). No model code.

`D` is the fine-tuning length (steps or tokens) and `L` the alignment loss after it. The claim to test is that
AlignGuard lowers the amplitude `A` at a similar exponent `beta`.

The fit is `scipy.optimize.least_squares` with a robust loss over the residuals r_i = L0 + A * D_i**beta - L_i:
`soft_l1` (default; quadratic for |r| << f, linear for |r| >> f), `huber`, or `linear` (ordinary least squares).
`f` (the residual scale where the loss turns linear) is set from the data: 1.4826 * the median absolute residual
of a near-L1 fit (soft_l1 with a tiny scale, which a minority of outliers does not pull), floored so noiseless data
stay well defined.

The cost is not convex in beta, so a local solver needs good starting points. At a fixed beta the model is linear
in (L0, A); closed-form least squares on a beta grid in `beta_range` gives a profile cost, and each local minimum
of that profile (plus the best grid point on each side of 0) starts one `least_squares` run. Each run keeps beta on
the side of 0 it started on, at least 1e-3 away from it (D**beta -> 1 there, collinear with the constant L0), and
inside `beta_range` (with 3 points the law interpolates exactly at some beta, however implausible). The run with
the lowest robust cost wins. D is divided by its geometric mean inside the fit (conditioning); A is reported on
the original scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy.optimize import least_squares

Loss = Literal["soft_l1", "huber", "linear"]
LOSSES = ("soft_l1", "huber", "linear")
_MIN_ABS_BETA = 1e-3


@dataclass
class ScalingFit:
    """A fitted forgetting law L(D) = L0 + A * D**beta.

    Args:
        L0: the asymptote as D**beta -> 0 (for beta > 0: the loss before fine-tuning, extrapolated).
        A: the amplitude of forgetting (same units as L, per unit of D**beta).
        beta: the exponent.
        r2: coefficient of determination of the fit on the original scale, over all points (outliers included).
        n: number of points.
        loss: the robust loss used.
        f_scale: the robust loss's residual scale (0 for `linear`).
    """

    L0: float
    A: float
    beta: float
    r2: float
    n: int
    loss: str = "soft_l1"
    f_scale: float = 0.0

    def predict(self, D) -> np.ndarray:
        """L(D) for an array of lengths."""
        return self.L0 + self.A * np.asarray(D, dtype=float) ** self.beta

    def to_dict(self) -> dict:
        """The four numbers written to scaling.json (`L0`, `A`, `beta`, `r2`)."""
        d = asdict(self)
        return {k: float(d[k]) for k in ("L0", "A", "beta", "r2")}


def _residuals(p: np.ndarray, u: np.ndarray, y: np.ndarray) -> np.ndarray:
    return p[0] + p[1] * u ** p[2] - y


def _jacobian(p: np.ndarray, u: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = u ** p[2]
    return np.stack([np.ones_like(u), x, p[1] * x * np.log(u)], axis=1)


def _linear_profile(u: np.ndarray, y: np.ndarray, grid: np.ndarray):
    """Least-squares (L0, A) and the sum of squared residuals at each beta of `grid` (vectorised over it)."""
    x = u[None, :] ** grid[:, None]
    # Centred normal equations: stable even when x spans many orders of magnitude.
    xc = x - x.mean(axis=1, keepdims=True)
    a = (xc * (y - y.mean())).sum(axis=1) / np.maximum((xc**2).sum(axis=1), 1e-300)
    l0 = y.mean() - a * x.mean(axis=1)
    sse = ((y - l0[:, None] - a[:, None] * x) ** 2).sum(axis=1)
    return l0, a, sse


def _starts(sse: np.ndarray, grid: np.ndarray) -> list[int]:
    """Grid indices that start a local fit: every local minimum of the profile and the best point per sign."""
    inner = (sse[1:-1] <= sse[:-2]) & (sse[1:-1] <= sse[2:])
    picks = set((np.flatnonzero(inner) + 1).tolist())
    for side in (grid < 0, grid > 0):
        if side.any():
            idx = np.flatnonzero(side)
            picks.add(int(idx[np.argmin(sse[idx])]))
    return sorted(picks)


def _robust_fit(u, y, loss: str, f: float, beta_range: tuple[float, float], grid_step: float):
    """The (L0, A, beta) with the lowest robust cost over the multi-start `least_squares` runs."""
    lo, hi = beta_range
    grid = np.arange(lo, hi + grid_step / 2, grid_step)
    grid = grid[np.abs(grid) >= _MIN_ABS_BETA]
    l0, a, sse = _linear_profile(u, y, grid)
    best = None
    for i in _starts(sse, grid):
        side = (lo, min(hi, -_MIN_ABS_BETA)) if grid[i] < 0 else (max(lo, _MIN_ABS_BETA), hi)
        run = least_squares(
            _residuals,
            np.array([l0[i], a[i], np.clip(grid[i], *side)]),  # np.arange may overshoot `hi` by rounding
            jac=_jacobian,
            bounds=([-np.inf, -np.inf, side[0]], [np.inf, np.inf, side[1]]),
            loss=loss,
            f_scale=f if loss != "linear" else 1.0,
            args=(u, y),
            x_scale="jac",
            # Tight tolerances: noiseless data must give the exact law back (relative error ~1e-8).
            ftol=1e-15,
            xtol=1e-15,
            gtol=1e-15,
        )
        if best is None or run.cost < best.cost:
            best = run
    return best.x


def fit_scaling_law(
    D,
    L,
    loss: Loss = "soft_l1",
    beta_range: tuple[float, float] = (-3.0, 3.0),
    grid_step: float = 0.01,
    f_scale: float | None = None,
) -> ScalingFit:
    """Fit L(D) = L0 + A * D**beta by robust nonlinear least squares (see the module docstring for the method).

    Args:
        D: fine-tuning lengths (steps or tokens), all > 0, at least 3 distinct values.
        L: the measured alignment loss at each length (finite).
        loss: `soft_l1` (default), `huber` or `linear` (ordinary least squares, not robust).
        beta_range: where the exponent may lie; a fit on the boundary means the law is a poor model of these points
            (or that there are too few of them to pin beta down).
        grid_step: spacing of the beta grid whose profile minima start the local fits.
        f_scale: the robust loss's residual scale; default: estimated from the data (module docstring).

    Returns:
        `ScalingFit` with L0, A (on the original scale of D), beta, R^2 (original scale, all points) and n.

    Raises:
        ValueError: on mismatched lengths, non-finite values, D <= 0, fewer than 3 distinct D, an unknown loss or an
            empty beta range.
    """
    D = np.asarray(D, dtype=float).ravel()
    y = np.asarray(L, dtype=float).ravel()
    if loss not in LOSSES:
        raise ValueError(f"loss: must be one of {LOSSES}, got {loss!r}")
    if D.shape != y.shape:
        raise ValueError(f"D and L must have the same length, got {D.size} and {y.size}")
    if not np.all(np.isfinite(D)):
        raise ValueError(f"D: every length must be finite, got {D.tolist()}")
    if np.any(D <= 0):
        raise ValueError(f"D: lengths must be > 0 (D**beta with beta < 0 is undefined at 0), got {D.tolist()}")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"L: every loss must be finite, got {y.tolist()}")
    if np.unique(D).size < 3:
        raise ValueError(f"D: need at least 3 distinct lengths to fit 3 parameters, got {np.unique(D).tolist()}")
    lo, hi = beta_range
    grid = np.arange(lo, hi + grid_step / 2, grid_step)
    if not np.any(np.abs(grid) >= _MIN_ABS_BETA):
        raise ValueError(f"beta_range: {beta_range} leaves no exponent with |beta| >= {_MIN_ABS_BETA} to try")
    if f_scale is not None and not f_scale > 0:
        raise ValueError(f"f_scale: must be > 0, got {f_scale}")

    d_ref = float(np.exp(np.mean(np.log(D))))
    u = D / d_ref
    spread = float(np.std(y)) + 1e-12 * (1.0 + float(np.max(np.abs(y))))
    if loss == "linear":
        f = 0.0
    elif f_scale is not None:
        f = float(f_scale)
    else:
        # A near-L1 fit is not pulled by a minority of outliers; its median absolute residual is then a robust
        # noise estimate. The floor keeps noiseless data (residuals ~ 0) well defined.
        near_l1 = _robust_fit(u, y, "soft_l1", 1e-3 * spread, (lo, hi), grid_step)
        f = max(1.4826 * float(np.median(np.abs(_residuals(near_l1, u, y)))), 1e-6 * spread)

    l0, a, beta = _robust_fit(u, y, loss, f, (lo, hi), grid_step)
    ss_res = float(np.sum(_residuals((l0, a, beta), u, y) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    # Constant L is fitted exactly by A = 0; call that a perfect fit rather than 0/0.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res <= 1e-24 else 0.0)
    a_orig = a * d_ref ** (-beta)
    return ScalingFit(
        L0=float(l0), A=float(a_orig), beta=float(beta), r2=float(r2), n=int(D.size), loss=loss, f_scale=f
    )
