"""Alignment-critical subspaces: the top eigenvectors U of each module's Fisher factor (docs/design.md §3).

m is the smallest number of eigenvalues that hold a fraction rho of the trace, clipped to [m_min, m_max]
(and to d_out), or a fixed m. Because the factors are normalised (trace = d_out), the energy rule only needs
the top eigenvalues, which is what makes randomized subspace iteration usable for large d_out. A module whose
output gradient was zero on the alignment data (raw trace 0) gets m = 0: an empty [d_out, 0] basis.

`eigenvalue_scales` gives the multiplier of each module's stored eigenvalues for the regulariser's
`normalise` option, from the raw traces that `build_subspaces` carries into `metadata["raw_traces"]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import factor_checks as checks
from .config import SubspaceConfig
from .fisher import FisherState
from .io import atomic_save_file, atomic_write_json

SUBSPACE_WEIGHTS = "subspaces.safetensors"
SUBSPACE_META = "subspaces.json"
SUBSPACE_FORMAT = 2  # 2 = raw_traces in the metadata, m = 0 modules, checked on load
NORMALISE_MODES = ("per_layer", "global", "none")


@dataclass
class Subspace:
    """U (d_out x m, orthonormal columns), its eigenvalues (m, descending) and the full trace used for energy.

    m = 0 (basis [d_out, 0], no eigenvalues, trace 0) is a module whose Fisher factor is zero: nothing to protect.
    """

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
        metadata: the config, the Fisher state's model id ("fisher") and "raw_traces" (canonical module name ->
            raw trace of its un-normalised Fisher factor; see `eigenvalue_scales`).
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
        meta = {"format_version": SUBSPACE_FORMAT, "modules": {}, "task_modules": {}, "input_modules": {}}
        meta.update(self.metadata)
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
        """Load saved subspaces, checking every basis (finite, orthonormal, [d, m] with m as in subspaces.json) and
        eigenvalue (finite, in [0, trace]).

        Raises:
            FileNotFoundError: if the files are missing.
            FisherFileError (a FisherMismatchError): if a file is unreadable, incomplete, corrupt or old.
        """
        directory = Path(directory)
        meta_path, weights_path = directory / SUBSPACE_META, directory / SUBSPACE_WEIGHTS
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no subspaces here; run `alignguard fisher` (or build_subspaces) first")
        meta = checks.read_json(meta_path)
        checks.reject_old_config(meta_path, meta.get("config"), checks.OLD_SUBSPACE_KEYS)
        tensors = checks.read_tensors(weights_path)
        out = cls()
        in_tensors, in_json = set(), set()
        for key in tensors:
            kind, _, rest = key.partition(".")
            name, _, part = rest.rpartition(".")
            if kind not in ("align", "task", "input") or part not in ("basis", "eigvals"):
                checks.fail(weights_path, f"unexpected tensor {key!r}")
            in_tensors.add(f"{kind}.{name}")
        for kind, table, key in out._tables():
            entries = meta.pop(key, {})
            if not isinstance(entries, dict):
                checks.fail(meta_path, f"field {key!r} must map module names to {{m, trace}}")
            for name, info in entries.items():
                in_json.add(f"{kind}.{name}")
                if f"{kind}.{name}" not in in_tensors:
                    continue  # reported below with the other differences
                table[name] = _checked_subspace(meta_path, weights_path, tensors, f"{kind}.{name}", info)
        checks.check_module_sets(meta_path, in_json, in_tensors, weights_path)
        if "raw_traces" in meta:
            checks.check_raw_traces(meta_path, meta["raw_traces"], out.subspaces)
        out.metadata = meta
        return out

    def summary(self) -> dict[str, dict]:
        return {
            n: {"m": s.m, "energy": round(s.energy, 4), "d_out": s.basis.shape[0]} for n, s in self.subspaces.items()
        }


def _checked_subspace(meta_path, weights_path, tensors, key: str, info) -> Subspace:
    if not (isinstance(info, dict) and isinstance(info.get("m"), int) and isinstance(info.get("trace"), (int, float))):
        checks.fail(meta_path, f"entry {key!r} must be {{'m': int, 'trace': float}}, got {info!r}")
    trace = float(info["trace"])
    if not (0.0 <= trace < float("inf")):
        checks.fail(meta_path, f"entry {key!r} has trace {trace}; expected a finite value >= 0")
    basis, eigvals = tensors[f"{key}.basis"], tensors.get(f"{key}.eigvals")
    if eigvals is None:
        checks.fail(weights_path, f"tensor {key + '.eigvals'!r} is missing")
    if basis.dim() != 2 or basis.shape[1] != info["m"]:
        checks.fail(
            weights_path, f"basis {key!r} has shape {list(basis.shape)}, but subspaces.json says m = {info['m']}"
        )
    checks.check_eigenpairs(weights_path, key, eigvals, basis, basis.shape[0], trace)
    return Subspace(basis, eigvals, trace)


def eigenvalue_scales(subspaces: AlignmentSubspaces, normalise: str = "per_layer") -> dict[str, float]:
    """Multiplier of each module's stored eigenvalues (factors normalised to mean eigenvalue 1) for `normalise`.

    - `per_layer`: 1 (the stored factors: every module has mean eigenvalue 1).
    - `none`: raw_trace_l / d_out_l, which gives back the raw factor (1/N) sum_t g_t g_t^T.
    - `global`: c * raw_trace_l / d_out_l with c = sum_l d_out_l / sum_l raw_trace_l: the raw factors under one
      common scale, so the modules keep their relative sizes and the mean eigenvalue over all modules is 1.

    Raises:
        ValueError: unknown `normalise`, or raw traces missing from `subspaces.metadata` (subspaces.json).
    """
    if normalise not in NORMALISE_MODES:
        raise ValueError(f"normalise: must be one of {', '.join(NORMALISE_MODES)}, got {normalise!r}")
    names = sorted(subspaces.subspaces)
    if normalise == "per_layer":
        return dict.fromkeys(names, 1.0)
    raw = subspaces.metadata.get("raw_traces") or {}
    missing = [n for n in names if n not in raw]
    if missing:
        raise ValueError(
            f"normalise={normalise!r} needs the raw traces of the Fisher factors, but subspaces.json (metadata "
            f"'raw_traces') has none for {len(missing)} modules (e.g. {missing[:3]}); it was built by an older "
            "alignguard or from a FisherState without raw_traces. Re-run `alignguard fisher`, or use "
            "normalise='per_layer'"
        )
    dims = {n: subspaces.subspaces[n].basis.shape[0] for n in names}
    scales = {n: float(raw[n]) / dims[n] for n in names}
    if normalise == "global":
        total = sum(float(raw[n]) for n in names)
        if total <= 0:
            raise ValueError("normalise='global': every raw trace in subspaces.json is 0; use normalise='per_layer'")
        c = sum(dims.values()) / total
        scales = {n: s * c for n, s in scales.items()}
    return scales


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
    if state.raw_traces and set(state.raw_traces) >= set(state.dims):
        out.metadata["raw_traces"] = {n: float(state.raw_traces[n]) for n in state.module_names}
    for name in state.module_names:
        out.subspaces[name] = _module_subspace(state, name, config)
    for name, factor in state.input_factors.items():
        d_in = factor.shape[0]
        eig, vec = _eig_top(factor, config, min(config.input_rank, d_in))
        trace = float(factor.double().trace())  # d_in, or 0 for all-zero inputs
        out.input_factors[name] = Subspace(vec.contiguous(), eig.clamp_min(0).contiguous(), trace)
    for name, (eig, vec) in state.input_low_rank.items():
        k = min(config.input_rank, len(eig))
        trace = float(state.dims[name][1]) if float(eig.sum()) > 0 else 0.0
        out.input_factors[name] = Subspace(vec[:, :k].contiguous(), eig[:k].contiguous(), trace)
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
    if _is_zero(state, name):  # tr G = 0: the module does not affect the loss; nothing to protect
        return Subspace(torch.zeros(d_out, 0), torch.zeros(0), 0.0)
    if name in state.factors:
        return subspace_from_factor(state.factors[name], config)
    eig, vec = state.low_rank[name]
    m = choose_m(eig, float(d_out), config, min(d_out, len(eig)))
    return Subspace(vec[:, :m].contiguous(), eig[:m].contiguous(), float(d_out))


def _is_zero(state: FisherState, name: str) -> bool:
    """Whether the module's factor is zero: raw trace 0, or (a state without raw traces) an all-zero factor."""
    if name in state.raw_traces:
        return state.raw_traces[name] == 0
    if name in state.factors:
        return not bool(state.factors[name].any())
    return not bool(state.low_rank[name][0].any())


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
