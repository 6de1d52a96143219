"""Configuration dataclasses for the AlignGuard method.

Every field carries help text (shown by the CLI) and every invalid value raises a `ValueError` that names
the field, so the same message serves Python users (`AlignGuardConfig(lambda_a=-1)`) and CLI users
(`--lambda_a -1`). The formulas the fields refer to are in docs/design.md §3-§4.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {message}")


@dataclass
class FisherConfig:
    """Options for estimating the per-module output-side Fisher factor on alignment data.

    Args:
        fisher_modules: module-name suffixes to estimate factors for (e.g. `q_proj`). `None` = every module a
            PEFT model has LoRA layers on, or, on a plain model, the usual attention/MLP projections.
        fisher_labels: `sampled` draws the labels from the model's own predictive distribution (the true
            Fisher); `empirical` uses the response tokens of the data.
        fisher_storage: `dense` keeps the full d_out x d_out factor per module; `sketch` keeps a streaming
            rank-`sketch_rank` Nystrom sketch (Tropp et al. 2017; O(d_out * k) memory) for models too large for
            dense factors.
        sketch_rank: rank of the streaming sketch (only with `fisher_storage="sketch"`).
        input_factor: also estimate the input-side factor A_in = E[x x^T] of every module over the same
            positions (the other half of the two-sided K-FAC Fisher G (x) A_in); `AlignGuardConfig(
            alignment_input="kfac")` needs it. Same memory as the output factor (d_in x d_in, or the sketch).
        max_batches: stop after this many batches (None = the whole data).
        allow_tf32: allow TF32 matmuls on Ampere+ GPUs while estimating.
        label_seed: seed for the label sampler (and the sketch's test matrix).
        show_progress: show a progress bar.
    """

    fisher_modules: list[str] | None = field(
        default=None, metadata={"help": "Module-name suffixes to estimate (default: the LoRA targets / projections)."}
    )
    fisher_labels: Literal["sampled", "empirical"] = field(
        default="sampled", metadata={"help": "Labels: 'sampled' from the model (true Fisher) or 'empirical'."}
    )
    fisher_storage: Literal["dense", "sketch"] = field(
        default="dense", metadata={"help": "'dense' d_out x d_out factors, or 'sketch' (O(d_out*k) memory)."}
    )
    sketch_rank: int = field(
        default=256, metadata={"help": "Rank k of the streaming sketch (fisher_storage='sketch')."}
    )
    input_factor: bool = field(
        default=False, metadata={"help": "Also estimate the input factor A_in = E[x x^T] (two-sided K-FAC)."}
    )
    max_batches: int | None = field(default=None, metadata={"help": "Use at most this many batches."})
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 matmuls during estimation."})
    label_seed: int = field(default=0, metadata={"help": "Seed for sampling labels."})
    show_progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self):
        _require(self.fisher_labels in ("sampled", "empirical"), "fisher_labels", "must be 'sampled' or 'empirical'")
        _require(self.fisher_storage in ("dense", "sketch"), "fisher_storage", "must be 'dense' or 'sketch'")
        _require(self.sketch_rank >= 1, "sketch_rank", f"must be >= 1, got {self.sketch_rank}")
        _require(self.max_batches is None or self.max_batches >= 1, "max_batches", "must be >= 1 or None")
        if isinstance(self.fisher_modules, str):
            self.fisher_modules = [self.fisher_modules]
        _require(
            self.fisher_modules is None or len(self.fisher_modules) > 0,
            "fisher_modules",
            "must be None or a non-empty list",
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SubspaceConfig:
    """Options for turning a Fisher factor into an alignment-critical subspace U (top eigenvectors).

    Args:
        energy: keep the smallest m whose eigenvalues hold this fraction of the trace (rho).
        m_min: lower clip of m.
        m_max: upper clip of m.
        fixed_m: if set, use exactly this m for every module (clipped to d_out), ignoring `energy`.
        eigen_solver: `exact` (torch.linalg.eigh), `randomized` (subspace iteration) or `auto` (randomized when
            d_out >= `randomized_min_dim`).
        randomized_min_dim: dimension from which `auto` switches to the randomized method.
        oversample: extra columns for randomized subspace iteration.
        power_iters: power iterations for randomized subspace iteration.
        solver_seed: seed for the random test matrix.
        input_rank: eigenpairs kept of each input factor A_in (when the Fisher state has one); the rest of its
            spectrum is kept as its mean, so A_in ~ P diag(rho) P^T + sigma (I - P P^T) keeps the trace.
    """

    energy: float = field(default=0.9, metadata={"help": "Energy fraction rho that the kept eigenvalues hold."})
    m_min: int = field(default=8, metadata={"help": "Smallest subspace dimension m."})
    m_max: int = field(default=128, metadata={"help": "Largest subspace dimension m."})
    fixed_m: int | None = field(default=None, metadata={"help": "Use this m for every module (ignores energy)."})
    eigen_solver: Literal["auto", "exact", "randomized"] = field(
        default="auto", metadata={"help": "Eigen-solver: exact eigh, randomized subspace iteration, or auto."}
    )
    randomized_min_dim: int = field(default=1024, metadata={"help": "d_out from which 'auto' goes randomized."})
    oversample: int = field(default=16, metadata={"help": "Oversampling p of randomized subspace iteration."})
    power_iters: int = field(default=4, metadata={"help": "Power iterations of randomized subspace iteration."})
    solver_seed: int = field(default=0, metadata={"help": "Seed of the randomized solver."})
    input_rank: int = field(default=64, metadata={"help": "Eigenpairs kept of each input factor A_in."})

    def __post_init__(self):
        _require(self.input_rank >= 1, "input_rank", f"must be >= 1, got {self.input_rank}")
        _require(0.0 < self.energy <= 1.0, "energy", f"must be in (0, 1], got {self.energy}")
        _require(self.m_min >= 1, "m_min", f"must be >= 1, got {self.m_min}")
        _require(self.m_max >= self.m_min, "m_max", f"must be >= m_min ({self.m_min}), got {self.m_max}")
        _require(self.fixed_m is None or self.fixed_m >= 1, "fixed_m", "must be >= 1 or None")
        _require(
            self.eigen_solver in ("auto", "exact", "randomized"), "eigen_solver", "must be auto, exact or randomized"
        )
        _require(self.oversample >= 0, "oversample", "must be >= 0")
        _require(self.power_iters >= 0, "power_iters", "must be >= 0")


@dataclass
class AlignGuardConfig:
    """The AlignGuard loss: L = L_task + mean_l [lambda_a R_A + lambda_t R_T + lambda_nc (alpha E_RM + (1-alpha) E_geo)].

    Args:
        lambda_a: weight of the alignment term R_A = ||G^1/2 dW_A||^2.
        lambda_t: weight of the task-stability term R_T = ||H^1/2 dW_T||^2.
        lambda_nc: weight of the collision terms.
        alpha: mix between the Riemannian overlap (alpha) and the geodesic separation (1 - alpha).
        task_metric: H in R_T: `identity` or `task_fisher` (the output factor estimated on task data).
        geo_metric: metric M of the geodesic term: `euclidean` (the literal reading, identically ~0),
            `task_fisher` (M = G_task) or `auto` (task_fisher when a task factor is available).
        overlap: `riemannian` (eta with a running-percentile tau and temperature) or `literal` (tau=0.01, T=1).
        overlap_beta: beta in eta = 1 + beta * sigmoid((|dW| - tau) / T).
        overlap_quantile: quantile of |dW| used as tau.
        overlap_temperature: T as a fraction of tau.
        overlap_tau_momentum: momentum of the running tau (detached).
        overlap_samples: entries sampled per module for the Monte-Carlo overlap on large layers.
        overlap_exact_max_entries: layers with at most this many weight entries get the exact overlap (above it,
            sampling `overlap_samples` entries is cheaper than materialising dW).
        overlap_tau_samples: entries sampled to update the running tau each step (0 = an exact quantile).
        mode: `penalty` (the loss above) or `project` (also remove U's component from lora_B's gradient and
            weights every step, a hard constraint).
        refresh_every: recompute the Fisher factor and U at the current weights every this many optimizer
            steps; None keeps the anchored basis from the starting weights.
        eps: epsilon in the geodesic ratio.
        alignment_input: input metric of R_A. `identity`: R_A = ||G_U^1/2 dW_A||^2 (docs/design.md §4, one-sided);
            `kfac`: R_A = tr(G_U dW_A A_in dW_A^T), the two-sided K-FAC quadratic, so updates are weighted by
            how much the alignment data's inputs excite them (needs `FisherConfig(input_factor=True)`).
        allow_unprotected: train LoRA layers that have no alignment subspace (the Fisher state was estimated on
            fewer modules than LoRA targets) without any AlignGuard term, with a warning; False raises instead.
        reduction: how the per-module terms combine: `mean` (each module weighs lambda / n_modules, so adding
            LoRA targets weakens the others) or `sum` (each module weighs lambda).
        normalise: per-module scale of the alignment eigenvalues: `per_layer` (every factor has mean eigenvalue
            1), `none` (the raw Fisher scale, raw trace / d_out) or `global` (the raw scale divided by one
            model-wide constant, so relative magnitudes across modules are kept at mean 1).
    """

    lambda_a: float = field(default=1.0, metadata={"help": "Weight of the alignment term R_A."})
    lambda_t: float = field(default=0.01, metadata={"help": "Weight of the task-stability term R_T."})
    lambda_nc: float = field(default=0.1, metadata={"help": "Weight of the collision terms (overlap + geodesic)."})
    alpha: float = field(default=0.5, metadata={"help": "Overlap share alpha of the collision terms (0..1)."})
    task_metric: Literal["identity", "task_fisher"] = field(
        default="identity", metadata={"help": "H of the task term: 'identity' or 'task_fisher'."}
    )
    geo_metric: Literal["auto", "euclidean", "task_fisher"] = field(
        default="auto", metadata={"help": "Metric of the geodesic term: auto, euclidean (literal, ~0), task_fisher."}
    )
    overlap: Literal["riemannian", "literal"] = field(
        default="riemannian", metadata={"help": "Overlap weighting: 'riemannian' (running tau) or 'literal'."}
    )
    overlap_beta: float = field(default=4.0, metadata={"help": "beta of the overlap weight eta."})
    overlap_quantile: float = field(default=0.9, metadata={"help": "Quantile of |dW| used as tau."})
    overlap_temperature: float = field(default=0.1, metadata={"help": "Temperature T as a fraction of tau."})
    overlap_tau_momentum: float = field(default=0.9, metadata={"help": "Momentum of the running tau."})
    overlap_samples: int = field(
        default=16384,
        metadata={
            "help": "Sampled entries per module (large layers). The estimate is unbiased; on SmolLM2-135M's 120 "
            "q/k/v/o modules its module mean has a 6% relative sd at 16384 (2% at 65536) for a quarter of the cost."
        },
    )
    overlap_exact_max_entries: int = field(
        default=65536, metadata={"help": "Layers with at most this many entries get the exact overlap."}
    )
    overlap_tau_samples: int = field(
        default=4096, metadata={"help": "Entries sampled to update the running tau (0 = all entries)."}
    )
    mode: Literal["penalty", "project"] = field(
        default="penalty", metadata={"help": "'penalty' or 'project' (hard-remove U's component from lora_B)."}
    )
    refresh_every: int | None = field(
        default=None, metadata={"help": "Recompute U every N optimizer steps (None: anchored basis from theta_0)."}
    )
    eps: float = field(default=1e-8, metadata={"help": "Epsilon of the geodesic ratio."})
    alignment_input: Literal["identity", "kfac"] = field(
        default="identity", metadata={"help": "Input metric of R_A: 'identity' or 'kfac' (A_in from the Fisher pass)."}
    )
    allow_unprotected: bool = field(
        default=False,
        metadata={"help": "Allow LoRA layers without an alignment subspace (trained unregularised, with a warning)."},
    )
    reduction: Literal["mean", "sum"] = field(
        default="mean", metadata={"help": "Combine the per-module terms by their 'mean' (lambda/n each) or 'sum'."}
    )
    normalise: Literal["per_layer", "global", "none"] = field(
        default="per_layer",
        metadata={
            "help": "Alignment eigenvalue scale: 'per_layer' (mean 1 each), 'global' (raw, mean 1), 'none' (raw)."
        },
    )

    def __post_init__(self):
        for name in ("lambda_a", "lambda_t", "lambda_nc", "overlap_beta"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _require(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        _require(self.task_metric in ("identity", "task_fisher"), "task_metric", "must be identity or task_fisher")
        _require(
            self.geo_metric in ("auto", "euclidean", "task_fisher"), "geo_metric", "must be auto/euclidean/task_fisher"
        )
        _require(self.overlap in ("riemannian", "literal"), "overlap", "must be riemannian or literal")
        _require(0.0 < self.overlap_quantile < 1.0, "overlap_quantile", "must be in (0, 1)")
        _require(self.overlap_temperature > 0, "overlap_temperature", "must be > 0")
        _require(0.0 <= self.overlap_tau_momentum < 1.0, "overlap_tau_momentum", "must be in [0, 1)")
        _require(self.overlap_samples >= 1, "overlap_samples", "must be >= 1")
        _require(self.overlap_tau_samples >= 0, "overlap_tau_samples", "must be >= 0")
        _require(self.mode in ("penalty", "project"), "mode", "must be penalty or project")
        _require(self.refresh_every is None or self.refresh_every >= 1, "refresh_every", "must be >= 1 or None")
        _require(self.eps > 0, "eps", "must be > 0")
        _require(self.alignment_input in ("identity", "kfac"), "alignment_input", "must be identity or kfac")
        _require(self.reduction in ("mean", "sum"), "reduction", f"must be 'mean' or 'sum', got {self.reduction!r}")
        _require(
            self.normalise in ("per_layer", "global", "none"),
            "normalise",
            f"must be 'per_layer', 'global' or 'none', got {self.normalise!r}",
        )

    def to_dict(self) -> dict:
        return asdict(self)
