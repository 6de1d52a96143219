"""Alignment-critical subspaces: the top eigenvectors U of each module's Fisher factor (docs/design.md §3).

m is the smallest number of eigenvalues that hold a fraction rho of the trace, clipped to [m_min, m_max]
(and to d_out), or a fixed m. Because the factors are normalised (trace = d_out), the energy rule only needs
the top eigenvalues, which is what makes randomized subspace iteration usable for large d_out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import SubspaceConfig
from .fisher import FisherState
from .io import atomic_save_file, atomic_write_json

SUBSPACE_WEIGHTS = "subspaces.safetensors"
SUBSPACE_META = "subspaces.json"


@dataclass
class Subspace:
    """U (d_out x m, orthonormal columns), its eigenvalues (m, descending) and the full trace used for energy."""

    basis: torch.Tensor
    eigvals: torch.Tensor
    trace: float

    @property
    def m(self) -> int:
        return self.basis.shape[1]

    @property
    def energy(self) -> float:
        return float(self.eigvals.sum()) / max(self.trace, 1e-30)

    @property
    def residual(self) -> float:
        """Mean of the eigenvalues not kept: the isotropic remainder sigma in P diag(rho) P^T + sigma (I - P P^T)."""
        rest = self.basis.shape[0] - self.m
        return max(self.trace - float(self.eigvals.sum()), 0.0) / rest if rest > 0 else 0.0


@dataclass
class AlignmentSubspaces:
    """Per-module alignment subspaces, plus optional low-rank task factors (for H / M = G_task).

    Attributes:
        subspaces: canonical module name -> `Subspace`.
        task_factors: canonical module name -> `Subspace` of the task-data factor (eigvals = mu, basis = V).
        input_factors: canonical module name -> `Subspace` of the input factor A_in (eigvals = rho, basis = P,
            trace = d_in; the remaining spectrum is `residual`), when the Fisher pass estimated it.
        metadata: the config and the Fisher metadata it came from.
    """

    subspaces: dict[str, Subspace] = field(default_factory=dict)
    task_factors: dict[str, Subspace] = field(default_factory=dict)
    input_factors: dict[str, Subspace] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def _tables(self):
        """(tensor-name prefix, table, metadata key) of every per-module table."""
        return (
            ("align", self.subspaces, "modules"),
            ("task", self.task_factors, "task_modules"),
            ("input", self.input_factors, "input_modules"),
        )

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        tensors = {}
        meta = {"modules": {}, "task_modules": {}, "input_modules": {}, **self.metadata}
        for kind, table, key in self._tables():
            for name, sub in table.items():
                tensors[f"{kind}.{name}.basis"] = sub.basis.contiguous().cpu()
                tensors[f"{kind}.{name}.eigvals"] = sub.eigvals.contiguous().cpu()
                meta[key][name] = {"m": sub.m, "trace": sub.trace}
        atomic_save_file(tensors, directory / SUBSPACE_WEIGHTS)
        atomic_write_json(directory / SUBSPACE_META, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> AlignmentSubspaces:
        directory = Path(directory)
        for p in (directory / SUBSPACE_META, directory / SUBSPACE_WEIGHTS):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no subspaces here; run `alignguard fisher` (or build_subspaces) first")
        meta = json.loads((directory / SUBSPACE_META).read_text())
        tensors = load_file(str(directory / SUBSPACE_WEIGHTS))
        out = cls()
        for kind, table, key in out._tables():
            for name, info in meta.pop(key, {}).items():
                table[name] = Subspace(
                    tensors[f"{kind}.{name}.basis"], tensors[f"{kind}.{name}.eigvals"], info["trace"]
                )
        out.metadata = meta
        return out

    def summary(self) -> dict[str, dict]:
        return {
            n: {"m": s.m, "energy": round(s.energy, 4), "d_out": s.basis.shape[0]} for n, s in self.subspaces.items()
        }


def choose_m(eigvals: torch.Tensor, trace: float, config: SubspaceConfig, dim: int) -> int:
    """Smallest m with sum_{k<=m} lambda_k / trace >= rho, clipped to [m_min, m_max] and to dim."""
    if config.fixed_m is not None:
        return min(config.fixed_m, dim)
    cum = torch.cumsum(eigvals.double().clamp_min(0), 0) / max(trace, 1e-30)
    reached = torch.nonzero(cum >= config.energy - 1e-9)
    m = int(reached[0]) + 1 if len(reached) else len(eigvals)
    return max(min(m, config.m_max, dim), min(config.m_min, dim))


def randomized_eigh(matrix: torch.Tensor, k: int, oversample: int = 16, power_iters: int = 4, seed: int = 0):
    """Top-k eigenpairs of a symmetric PSD matrix by randomized subspace iteration (Halko et al. 2011, Alg. 4.4).

    Returns (eigvals [k] descending, eigvecs [d, k]).
    """
    d = matrix.shape[0]
    width = min(d, k + oversample)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(d, width, generator=gen, dtype=matrix.dtype).to(matrix.device)
    q = torch.linalg.qr(matrix @ q).Q
    for _ in range(power_iters):
        # Re-orthonormalise every iteration so small eigen-directions are not lost to round-off.
        q = torch.linalg.qr(matrix @ q).Q
    small = q.T @ matrix @ q
    w, v = torch.linalg.eigh((small + small.T) / 2)
    order = torch.argsort(w, descending=True)[:k]
    return w[order], q @ v[:, order]


def _eig_top(matrix: torch.Tensor, config: SubspaceConfig, k: int):
    d = matrix.shape[0]
    use_random = config.eigen_solver == "randomized" or (
        config.eigen_solver == "auto" and d >= config.randomized_min_dim
    )
    if use_random and k + config.oversample < d:
        return randomized_eigh(matrix.float(), k, config.oversample, config.power_iters, config.solver_seed)
    w, v = torch.linalg.eigh(matrix.double())
    return w.flip(0)[:k].float(), v.flip(1)[:, :k].float()


def subspace_from_factor(factor: torch.Tensor, config: SubspaceConfig) -> Subspace:
    """The alignment subspace of one dense factor."""
    d = factor.shape[0]
    trace = float(factor.double().trace())
    k = min(d, config.fixed_m if config.fixed_m is not None else config.m_max)
    eig, vec = _eig_top(factor, config, k)
    m = choose_m(eig, trace, config, d)
    return Subspace(vec[:, :m].contiguous(), eig[:m].clamp_min(0).contiguous(), trace)


def build_subspaces(
    state: FisherState,
    config: SubspaceConfig | None = None,
    task_state: FisherState | None = None,
    task_rank: int = 64,
) -> AlignmentSubspaces:
    """Alignment subspaces for every module of `state` (and low-rank task factors from `task_state`).

    Args:
        state: alignment `FisherState` (dense or sketched).
        config: `SubspaceConfig` (energy rule, clipping, solver).
        task_state: optional Fisher state on task data; gives H = G_task for R_T and M = G_task for E_geo.
        task_rank: rank kept for the task factors (G_task ~ V diag(mu) V^T); keeping it low-rank bounds memory.
    """
    config = config or SubspaceConfig()
    out = AlignmentSubspaces(metadata={"config": vars(config).copy(), "fisher": state.metadata.get("model_id")})
    for name in state.module_names:
        out.subspaces[name] = _module_subspace(state, name, config)
    for name, factor in state.input_factors.items():
        d_in = factor.shape[0]
        eig, vec = _eig_top(factor, config, min(config.input_rank, d_in))
        out.input_factors[name] = Subspace(vec.contiguous(), eig.clamp_min(0).contiguous(), float(d_in))
    for name, (eig, vec) in state.input_low_rank.items():
        k = min(config.input_rank, len(eig))
        out.input_factors[name] = Subspace(vec[:, :k].contiguous(), eig[:k].contiguous(), float(state.dims[name][1]))
    if task_state is not None:
        task_cfg = SubspaceConfig(
            fixed_m=task_rank,
            m_min=1,
            m_max=max(task_rank, 1),
            eigen_solver=config.eigen_solver,
            randomized_min_dim=config.randomized_min_dim,
            solver_seed=config.solver_seed,
        )
        for name in task_state.module_names:
            if name in out.subspaces:
                out.task_factors[name] = _module_subspace(task_state, name, task_cfg)
    return out


def _module_subspace(state: FisherState, name: str, config: SubspaceConfig) -> Subspace:
    d_out = state.dims[name][0]
    if name in state.factors:
        return subspace_from_factor(state.factors[name], config)
    eig, vec = state.low_rank[name]
    m = choose_m(eig, float(d_out), config, min(d_out, len(eig)))
    return Subspace(vec[:, :m].contiguous(), eig[:m].contiguous(), float(d_out))


def random_subspaces(reference: AlignmentSubspaces, seed: int = 0) -> AlignmentSubspaces:
    """Random orthonormal bases with the same m per module (the 'random subspace' control).

    Eigenvalues are kept (so R_A has the same scale); only the directions are random.
    """
    gen = torch.Generator().manual_seed(seed)
    out = AlignmentSubspaces(
        metadata={**reference.metadata, "random_seed": seed},
        task_factors=dict(reference.task_factors),
        input_factors=dict(reference.input_factors),
    )
    for name, sub in reference.subspaces.items():
        q = torch.linalg.qr(torch.randn(sub.basis.shape[0], sub.m, generator=gen)).Q
        out.subspaces[name] = Subspace(q.contiguous(), sub.eigvals.clone(), sub.trace)
    return out
