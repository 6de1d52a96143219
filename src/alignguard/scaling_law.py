"""Forgetting scaling law: a robust fit of L(D) = L0 + A * D**beta (docs/design.md §8). Pure numpy, no model code.

`D` is the fine-tuning length (steps or tokens) and `L` the alignment loss after it. The claim to test is that
AlignGuard lowers the amplitude `A` at a similar exponent `beta`.

The fit minimises a robust cost over the residuals r_i = L_i - L0 - A * D_i**beta, in the convention of
`scipy.optimize.least_squares` (which we do not depend on): cost = sum_i f**2 * rho((r_i / f)**2) / 2 with

* `linear`:  rho(z) = z                          (ordinary least squares),
* `soft_l1`: rho(z) = 2 * (sqrt(1 + z) - 1)      (smooth: quadratic for |r| << f, linear for |r| >> f),
* `huber`:   rho(z) = z if z <= 1 else 2 * sqrt(z) - 1.

`f` (the residual scale where the loss turns linear) is set from the data: 1.4826 * the median absolute residual
of a near-L1 fit (robust to a minority of outliers), floored so noiseless data stay well defined.

For a fixed beta the model is linear in (L0, A) and the robust cost is convex in them, so iteratively reweighted
least squares (IRLS) finds their unique optimum; this gives a profile cost c(beta). We scan beta on a grid in
`beta_range` (excluding |beta| < 1e-3, where D**beta is collinear with the constant), refine the best grid point by
golden-section search, and polish (L0, A, beta) jointly with a few weighted Gauss-Newton steps that are kept only
when they lower the cost. D is divided by its geometric mean inside the fit (conditioning); A is reported on the
original scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Loss = Literal["soft_l1", "huber", "linear"]
LOSSES = ("soft_l1", "huber", "linear")


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
        f_scale: the residual scale of the robust loss (0 for `linear`).
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


def _weights(r: np.ndarray, f: float, loss: str) -> np.ndarray:
    # IRLS weight = rho'(z) with z = (r/f)**2: the factor by which each squared residual counts at this iterate.
    if loss == "linear":
        return np.ones_like(r)
    z = (r / f) ** 2
    if loss == "soft_l1":
        return 1.0 / np.sqrt(1.0 + z)
    return np.where(z <= 1.0, 1.0, 1.0 / np.sqrt(np.maximum(z, 1.0)))


def _cost(r: np.ndarray, f: float, loss: str) -> np.ndarray:
    """Robust cost summed over the last axis."""
    if loss == "linear":
        return 0.5 * np.sum(r**2, axis=-1)
    z = (r / f) ** 2
    if loss == "soft_l1":
        rho = 2.0 * (np.sqrt(1.0 + z) - 1.0)
    else:
        rho = np.where(z <= 1.0, z, 2.0 * np.sqrt(np.maximum(z, 1.0)) - 1.0)
    return 0.5 * f**2 * np.sum(rho, axis=-1)


def _solve_linear(x: np.ndarray, y: np.ndarray, f: float, loss: str, iters: int = 200):
    """IRLS for (L0, A) at fixed beta, vectorised over the rows of `x` (one row per beta).

    Returns (L0, A, cost), each of shape x.shape[:-1].
    """
    w = np.ones_like(x)
    for _ in range(iters if loss != "linear" else 1):
        sw = w.sum(-1, keepdims=True)
        # Centred weighted normal equations: stable even when x spans many orders of magnitude.
        xm = (w * x).sum(-1, keepdims=True) / sw
        ym = (w * y).sum(-1, keepdims=True) / sw
        sxx = (w * (x - xm) ** 2).sum(-1, keepdims=True)
        a = (w * (x - xm) * (y - ym)).sum(-1, keepdims=True) / np.maximum(sxx, 1e-300)
        l0 = ym - a * xm
        r = y - l0 - a * x
        w_new = _weights(r, f, loss)
        if np.max(np.abs(w_new - w)) < 1e-12:
            w = w_new
            break
        w = w_new
    r = y - l0 - a * x
    return l0[..., 0], a[..., 0], _cost(r, f, loss)


def _profile(beta: float, u: np.ndarray, y: np.ndarray, f: float, loss: str) -> tuple[float, float, float]:
    l0, a, c = _solve_linear(u[None, :] ** beta, y, f, loss)
    return float(l0[0]), float(a[0]), float(c[0])


def _golden(fn, lo: float, hi: float, tol: float = 1e-10, max_iter: int = 200) -> float:
    """Minimum of a unimodal function on [lo, hi] by golden-section search."""
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = fn(c), fn(d)
    for _ in range(max_iter):
        if hi - lo < tol:
            break
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = fn(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = fn(d)
    return (lo + hi) / 2


def _gauss_newton(params, u, y, f, loss, bounds: tuple[float, float], steps: int = 30):
    """Weighted Gauss-Newton on (L0, A, beta) jointly; a step is kept only if it lowers the robust cost and keeps
    beta inside `bounds` (with 3 points the law interpolates exactly at some beta, however implausible)."""
    l0, a, beta = params
    logu = np.log(u)

    def cost_of(p):
        return float(_cost(y - p[0] - p[1] * u ** p[2], f, loss))

    best = cost_of((l0, a, beta))
    for _ in range(steps):
        x = u**beta
        r = y - l0 - a * x
        sw = np.sqrt(_weights(r, f, loss))
        jac = np.stack([np.ones_like(u), x, a * x * logu], axis=1)
        delta, *_ = np.linalg.lstsq(jac * sw[:, None], r * sw, rcond=None)
        for scale in (1.0, 0.5, 0.25, 0.125):
            cand = (l0 + scale * delta[0], a + scale * delta[1], beta + scale * delta[2])
            if not all(map(math.isfinite, cand)) or abs(cand[2]) < 1e-3 or not bounds[0] <= cand[2] <= bounds[1]:
                continue
            c = cost_of(cand)
            if c < best:
                best, (l0, a, beta) = c, cand
                break
        else:
            break
    return l0, a, beta


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
        grid_step: spacing of the beta grid before golden-section refinement.
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
    grid = grid[np.abs(grid) >= 1e-3]
    if grid.size == 0:
        raise ValueError(f"beta_range: {beta_range} leaves no exponent with |beta| >= 1e-3 to try")

    d_ref = float(np.exp(np.mean(np.log(D))))
    u = D / d_ref
    x = u[None, :] ** grid[:, None]
    spread = float(np.std(y)) + 1e-12 * (1.0 + float(np.max(np.abs(y))))
    if loss == "linear":
        f = 0.0
    elif f_scale is not None:
        if not f_scale > 0:
            raise ValueError(f"f_scale: must be > 0, got {f_scale}")
        f = float(f_scale)
    else:
        # A near-L1 fit (soft_l1 with a tiny scale) is not pulled by a minority of outliers; its median absolute
        # residual is then a robust noise estimate. The floor keeps noiseless data (residuals ~ 0) well defined.
        tiny = 1e-3 * spread
        l0, a, c = _solve_linear(x, y, tiny, "soft_l1")
        i = int(np.argmin(c))
        r = y - l0[i] - a[i] * x[i]
        f = max(1.4826 * float(np.median(np.abs(r))), 1e-6 * spread)

    _, _, costs = _solve_linear(x, y, f, loss)
    i = int(np.argmin(costs))
    b_lo, b_hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    beta = _golden(lambda b: _profile(b, u, y, f, loss)[2], float(b_lo), float(b_hi))
    if abs(beta) < 1e-3:
        beta = float(grid[i])
    l0, a, _ = _profile(beta, u, y, f, loss)
    l0, a, beta = _gauss_newton((l0, a, beta), u, y, f, loss, (float(lo), float(hi)))

    pred = l0 + a * u**beta
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    # Constant L is fitted exactly by A = 0; call that a perfect fit rather than 0/0.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res <= 1e-24 else 0.0)
    a_orig = a * d_ref ** (-beta)
    return ScalingFit(
        L0=float(l0), A=float(a_orig), beta=float(beta), r2=float(r2), n=int(D.size), loss=loss, f_scale=f
    )
