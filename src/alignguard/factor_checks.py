"""Reading and checking saved Fisher states and subspaces (fisher.json/.safetensors, subspaces.json/.safetensors).

A file that cannot be read, or whose numbers cannot be a Fisher factor (non-finite, not PSD, bases that are not
orthonormal, shapes that disagree with the JSON), raises `FisherFileError` naming the file, what is wrong and the
fix, instead of producing NaN adapters later. The checks are O(d^2) per dense factor and O(d k^2) per basis, done
in row blocks so a large factor needs no second full-size copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

REFIT = "re-run `alignguard fisher` to write it again"
# Relative tolerances of the checks (float32 factors and bases from float64 eigh / float32 QR are far inside them).
ORTHO_TOL = 1e-3
TRACE_TOL = 1e-3
EIG_TOL = 1e-4
_BLOCK = 1024

# Config keys renamed in FisherConfig / SubspaceConfig; a file that still has them was written by an older version.
OLD_FISHER_KEYS = {"mode": "fisher_storage", "seed": "label_seed", "target_modules": "fisher_modules"}
OLD_SUBSPACE_KEYS = {"method": "eigen_solver", "seed": "solver_seed"}


class FisherMismatchError(ValueError):
    """A cached Fisher state was made for a different model or configuration."""


class FisherFileError(FisherMismatchError):
    """A saved Fisher state or subspace file is unreadable, incomplete or holds numbers that cannot be a factor."""


def fail(path, message: str):
    raise FisherFileError(f"{path}: {message}; {REFIT}")


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or `FisherFileError` if it is not valid JSON / not an object."""
    try:
        meta = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(path, f"not valid JSON ({exc})")
    if not isinstance(meta, dict):
        fail(path, f"expected a JSON object, got {type(meta).__name__}")
    return meta


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or `FisherFileError` if it is truncated or corrupt."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        fail(path, f"cannot be read as safetensors (truncated or corrupt: {exc})")


def reject_old_config(path, config, old_keys: dict[str, str]) -> None:
    """`FisherFileError` if `config` (the saved config dict) still uses keys that were renamed."""
    if isinstance(config, dict):
        old = sorted(k for k in old_keys if k in config)
        if old:
            renamed = ", ".join(f"{k} -> {old_keys[k]}" for k in old)
            fail(path, f"written by an older alignguard (config keys renamed since: {renamed})")


def require(path, meta: dict, key: str, kind: type):
    """`meta[key]`, which must be present, not null and a `kind`."""
    value = meta.get(key)
    if value is None:
        fail(path, f"field {key!r} is {'null' if key in meta else 'missing'}")
    if not isinstance(value, kind):
        fail(path, f"field {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def check_shape(path, key: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        fail(path, f"tensor {key!r} has shape {list(tensor.shape)} but the JSON says {list(shape)}")


def check_dense_factor(path, key: str, factor: torch.Tensor, dim: int) -> None:
    """A trace-normalised PSD factor: finite, symmetric, |F_ij| <= sqrt(F_ii F_jj), trace = dim (or all zero)."""
    check_shape(path, key, factor, (dim, dim))
    diag = factor.diagonal().double()
    if not torch.isfinite(diag).all() or (diag < -EIG_TOL).any():
        fail(path, f"tensor {key!r} has a non-finite or negative diagonal; not a Fisher factor")
    trace = float(diag.sum())
    root = diag.clamp_min(0).sqrt()
    scale = float(diag.abs().max()) if dim else 0.0
    for start in range(0, dim, _BLOCK):
        rows = factor[start : start + _BLOCK].double()
        if not torch.isfinite(rows).all():
            fail(path, f"tensor {key!r} has non-finite entries (NaN/Inf)")
        asym = (rows - factor[:, start : start + _BLOCK].T.double()).abs().max()
        bound = root[start : start + _BLOCK, None] * root[None, :] * (1 + TRACE_TOL) + EIG_TOL * max(scale, 1.0)
        if asym > EIG_TOL * max(scale, 1.0) or (rows.abs() > bound).any():
            fail(path, f"tensor {key!r} is not symmetric positive semi-definite (corrupt values)")
    if trace == 0.0 and scale == 0.0:
        return  # a module whose gradient was zero: an all-zero factor (tr G = 0)
    if abs(trace - dim) > TRACE_TOL * dim:
        fail(
            path, f"tensor {key!r} has trace {trace:.6g}, expected {dim} (factors are normalised to mean eigenvalue 1)"
        )


def check_eigenpairs(path, key: str, eigvals: torch.Tensor, vecs: torch.Tensor, dim: int, trace: float) -> None:
    """Eigenvalues finite, in [0, trace] (within tolerance), summing to at most `trace`; `vecs` orthonormal columns."""
    k = vecs.shape[1] if vecs.dim() == 2 else -1
    check_shape(path, f"{key}.eigvals", eigvals, (k,))
    check_shape(path, f"{key} basis", vecs, (dim, k))
    ev = eigvals.double()
    if not torch.isfinite(ev).all():
        fail(path, f"eigenvalues of {key!r} are not finite (NaN/Inf)")
    tol = EIG_TOL * max(trace, 1.0)
    if (ev < -tol).any() or (ev > trace + tol).any() or float(ev.clamp_min(0).sum()) > trace * (1 + TRACE_TOL) + tol:
        fail(path, f"eigenvalues of {key!r} lie outside [0, trace={trace:.6g}] (corrupt values)")
    check_orthonormal(path, key, vecs)


def check_orthonormal(path, key: str, vecs: torch.Tensor) -> None:
    if vecs.numel() == 0:
        return
    v = vecs.double()
    if not torch.isfinite(v).all():
        fail(path, f"basis of {key!r} has non-finite entries (NaN/Inf)")
    err = float((v.T @ v - torch.eye(v.shape[1], dtype=torch.float64)).abs().max())
    if err > ORTHO_TOL:
        fail(path, f"basis of {key!r} is not orthonormal (max |U^T U - I| = {err:.3g})")


def check_module_sets(path, in_json: set[str], in_tensors: set[str], tensors_path) -> None:
    """The same module names in the JSON and in the tensor file."""
    extra, missing = sorted(in_tensors - in_json), sorted(in_json - in_tensors)
    if extra or missing:
        fail(
            path,
            f"modules disagree with {Path(tensors_path).name}: only in the tensors {extra[:5]} "
            f"({len(extra)}), only in the JSON {missing[:5]} ({len(missing)})",
        )


def check_raw_traces(path, raw_traces, names) -> None:
    if not isinstance(raw_traces, dict) or set(raw_traces) != set(names):
        fail(path, "field 'raw_traces' must map every module to its raw trace")
    bad = [n for n, v in raw_traces.items() if not isinstance(v, (int, float)) or not (0.0 <= v < float("inf"))]
    if bad:
        fail(path, f"field 'raw_traces' has non-finite or negative values for {bad[:5]}")


FISHER_TENSOR_KINDS = ("factor", "eigvals", "eigvecs", "input_factor", "input_eigvals", "input_eigvecs")


def read_dims(path, dims: dict) -> dict[str, tuple[int, int]]:
    out = {}
    for name, d in dims.items():
        if not (isinstance(d, list) and len(d) == 2 and all(isinstance(x, int) and x >= 1 for x in d)):
            fail(path, f"field 'dims' of {name!r} must be [d_out, d_in] (positive integers), got {d!r}")
        out[name] = (d[0], d[1])
    return out


def fill_fisher_tensors(state, tensors: dict, weights_path, meta_path) -> None:
    """Put the tensors of fisher.safetensors into a `FisherState`, checking names, shapes and values against fisher.json's dims."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, kind = key.rpartition(".")
        if kind not in FISHER_TENSOR_KINDS:
            fail(weights_path, f"unexpected tensor {key!r}")
        by_module.setdefault(name, {})[kind] = tensor
    check_module_sets(meta_path, set(state.dims), set(by_module), weights_path)
    for name, found in by_module.items():
        d_out, d_in = state.dims[name]
        if "factor" in found:
            check_dense_factor(weights_path, f"{name}.factor", found["factor"], d_out)
            state.factors[name] = found["factor"]
        elif "eigvals" in found and "eigvecs" in found:
            trace = 0.0 if state.raw_traces.get(name) == 0 else float(d_out)
            check_eigenpairs(weights_path, f"{name}.eigvecs", found["eigvals"], found["eigvecs"], d_out, trace)
            state.low_rank[name] = (found["eigvals"], found["eigvecs"])
        else:
            fail(weights_path, f"module {name!r} has no factor (nor eigvals + eigvecs)")
        if "input_factor" in found:
            check_dense_factor(weights_path, f"{name}.input_factor", found["input_factor"], d_in)
            state.input_factors[name] = found["input_factor"]
        elif "input_eigvals" in found and "input_eigvecs" in found:
            eig, vec = found["input_eigvals"], found["input_eigvecs"]
            check_eigenpairs(weights_path, f"{name}.input_eigvecs", eig, vec, d_in, float(d_in))
            state.input_low_rank[name] = (eig, vec)
        elif "input_eigvals" in found or "input_eigvecs" in found:
            fail(weights_path, f"module {name!r} has only half of input_eigvals + input_eigvecs")
