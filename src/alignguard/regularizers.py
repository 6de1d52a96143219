"""The AlignGuard regularisers in closed low-rank form, batched over modules of equal shape (docs/design.md §4).

For one LoRA module with A (r x d_in), B (d_out x r), scale s, alignment basis U (d_out x m) and eigenvalues
lambda, let C = U^T B, S = A A^T, B_A = U C and B_T = B - B_A, so dW_A = s B_A A and dW_T = s B_T A:

    R_A   = ||G^1/2 dW_A||^2          = s^2 sum_k lambda_k (C S C^T)_kk
    R_T   = ||H^1/2 dW_T||^2          = s^2 tr(B_T^T H B_T S)          (H = I, or H = V diag(mu) V^T = G_task)
    <dW_A, dW_T>_M                    = s^2 tr(B_T^T M B_A S)
    E_geo = <dW_A, dW_T>_M^2 / (||dW_A||_M^2 ||dW_T||_M^2 + eps)
    E_RM  = mean_ij eta_ij |(dW_A)_ij (dW_T)_ij|,  eta = 1 + beta sigmoid((|dW| - tau) / T)

Each module's terms are combined by `AlignGuardConfig.reduction` (the mean over modules, or their sum), and each
module's eigenvalues lambda are multiplied by the scale `AlignGuardConfig.normalise` gives it
(`alignguard.subspace.eigenvalue_scales`): 1 keeps every factor at mean eigenvalue 1 (`per_layer`); the raw trace
per output dimension restores the modules' relative Fisher magnitudes (`none`), and `global` rescales that to a
mean of 1. The task and input factors are not rescaled: lambda_t has its own weight, and A_in is the other
Kronecker factor of the same quadratic (scaling it too would count the raw magnitude twice).

None of these materialises dW except the exact overlap on small layers. Modules with the same (d_out, d_in, r)
are stacked and handled with batched matmuls: a Python loop over 154 modules of a 1.1B model cost 1.53x a
plain LoRA step on an H100, the grouped version 1.016x (docs/design.md §4). Bases with different m in a group are
zero-padded to the largest m (zero columns and zero eigenvalues add nothing to any term).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .config import AlignGuardConfig
from .distributed import whole_weight
from .subspace import AlignmentSubspaces, eigenvalue_scales
from .targets import layer_dims, lora_modules

TERM_NAMES = ("alignment", "task", "overlap", "geodesic")
# How many module names an error or warning lists before "...".
_SHOWN = 5


def _nonfinite_factors(name: str, subspaces: AlignmentSubspaces) -> list[str]:
    """Which stored tensors of module `name` hold NaN/inf (corrupt factors would train to NaN adapters)."""
    bad = []
    for kind, table in (
        ("", subspaces.subspaces),
        ("task ", subspaces.task_factors),
        ("input ", subspaces.input_factors),
    ):
        sub = table.get(name)
        if sub is None:
            continue
        for field in ("basis", "eigvals"):
            if not bool(torch.isfinite(getattr(sub, field)).all()):
                bad.append(f"{kind}{field}")
    return bad


@dataclass
class _Group:
    """Modules of one shape with their stacked, padded bases (buffers live on the LoRA weights' device)."""

    names: list[str]
    layers: list[nn.Module]
    basis: torch.Tensor  # (G, d_out, m)
    eigvals: torch.Tensor  # (G, m)
    task_basis: torch.Tensor | None  # (G, d_out, k)
    task_eigvals: torch.Tensor | None  # (G, k)
    scales: torch.Tensor  # (G,)
    exact_overlap: bool
    tau: torch.Tensor  # (G,) running |dW| quantile, detached
    # alignment_input="kfac": A_in ~ P diag(rho) P^T + sigma (I - P P^T), stored as P, rho - sigma (0-padded), sigma.
    in_basis: torch.Tensor | None = None  # (G, d_in, k)
    in_coef: torch.Tensor | None = None  # (G, k)
    in_sigma: torch.Tensor | None = None  # (G,)

    def to_(self, device: torch.device) -> None:
        """Move the buffers, in place: engines such as FSDP/DeepSpeed move the model after the trainer is built."""
        for field in (
            "basis",
            "eigvals",
            "task_basis",
            "task_eigvals",
            "scales",
            "tau",
            "in_basis",
            "in_coef",
            "in_sigma",
        ):
            value = getattr(self, field)
            if value is not None:
                setattr(self, field, value.to(device))


def _pad_stack(mats: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in mats])


class AlignGuardRegularizer:
    """Computes the AlignGuard terms of a PEFT model's LoRA updates against alignment subspaces.

    Args:
        model: a `peft.PeftModel` (or any model holding PEFT LoRA layers).
        subspaces: `AlignmentSubspaces` keyed by canonical module names.
        config: `AlignGuardConfig`.
        adapter_name: adapter to regularise (default: each layer's active adapter).
        seed: seed of the regulariser's own random generator (the sampled overlap's blocks and tau's subsample),
            so computing the terms never draws from torch's global RNG (dropout, data order stay as without it).

    Attributes:
        unprotected: sorted canonical names of the LoRA layers that have no alignment subspace (they get no
            AlignGuard term); non-empty only with `config.allow_unprotected=True`.
        n_modules: number of regularised modules.

    Raises:
        ValueError: if no LoRA layer has a subspace (names from a different model, or no LoRA layers); if some
            have none and `allow_unprotected` is False; if a factor holds NaN/inf.
    """

    def __init__(
        self,
        model: nn.Module,
        subspaces: AlignmentSubspaces,
        config: AlignGuardConfig | None = None,
        adapter_name: str | None = None,
        seed: int = 0,
    ):
        self.config = config or AlignGuardConfig()
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        layers = lora_modules(model, adapter_name)
        matched = {n: v for n, v in layers.items() if n in subspaces.subspaces}
        if not matched:
            raise ValueError(
                f"none of the {len(layers)} LoRA layers has an alignment subspace (LoRA layers: "
                f"{sorted(layers)[:4]}..., subspaces: {sorted(subspaces.subspaces)[:4]}...); estimate the Fisher "
                "state on the same base model and target modules"
            )
        self.unprotected = sorted(set(layers) - set(matched))
        if self.unprotected:
            self._check_unprotected(len(layers))
        corrupt = {n: bad for n in sorted(matched) if (bad := _nonfinite_factors(n, subspaces))}
        if corrupt:
            raise ValueError(
                f"the alignment factors of {len(corrupt)} modules hold NaN/inf values "
                f"({dict(list(corrupt.items())[:_SHOWN])}); the terms would be NaN and train NaN adapters. "
                "Re-estimate the Fisher state (`alignguard fisher`)"
            )
        self.use_task_metric = self.config.task_metric == "task_fisher"
        geo = self.config.geo_metric
        if geo == "auto":
            geo = "task_fisher" if subspaces.task_factors else "euclidean"
        if (geo == "task_fisher" or self.use_task_metric) and not subspaces.task_factors:
            raise ValueError(
                "geo_metric/task_metric='task_fisher' needs task factors: pass task_state to build_subspaces "
                "(a Fisher pass on task data), or use 'euclidean'/'identity'"
            )
        self.geo_metric = geo
        if self.config.alignment_input == "kfac":
            missing = sorted(set(matched) - set(subspaces.input_factors))
            if missing:
                raise ValueError(
                    f"alignment_input='kfac' needs the input factor of every LoRA module, missing for {missing[:4]} "
                    f"({len(missing)} modules): estimate the Fisher state with FisherConfig(input_factor=True) "
                    "(`alignguard fisher --input_factor true`), or use alignment_input='identity'"
                )
        self.eigenvalue_scales = eigenvalue_scales(subspaces, self.config.normalise)
        self.groups = self._build_groups(matched, subspaces)
        self.n_modules = len(matched)

    @property
    def unmatched(self) -> list[str]:  # the name before `unprotected`
        return self.unprotected

    def _check_unprotected(self, n_layers: int) -> None:
        names, n = self.unprotected, len(self.unprotected)
        shown = ", ".join(names[:_SHOWN]) + (", ..." if n > _SHOWN else "")
        what = f"{n} of {n_layers} LoRA layers have no alignment subspace, so AlignGuard does not regularise them"
        what += f" ({shown})"
        if not self.config.allow_unprotected:
            raise ValueError(
                f"{what}. Estimate the Fisher state on the LoRA target modules (FisherConfig(fisher_modules=...) / "
                "`alignguard fisher --fisher_modules ...` with the same modules as the LoRA config), or pass "
                "AlignGuardConfig(allow_unprotected=True) / `--allow_unprotected true` to train them unprotected"
            )
        warnings.warn(f"AlignGuard: {what}; allow_unprotected=True, so training goes on", stacklevel=3)

    def carry_state_from(self, other: AlignGuardRegularizer) -> None:
        """Keep `other`'s running tau (per module group) and random generators, e.g. across a subspace refresh."""
        self._generators = other._generators
        taus = {tuple(g.names): g.tau for g in other.groups}
        for group in self.groups:
            tau = taus.get(tuple(group.names))
            if tau is not None:
                group.tau = tau.to(group.tau.device)

    def _build_groups(self, matched, subspaces: AlignmentSubspaces) -> list[_Group]:
        buckets: dict[tuple, list[str]] = defaultdict(list)
        for name, (layer, adapter) in matched.items():
            d_out, d_in = layer_dims(layer.get_base_layer())
            buckets[(d_out, d_in, layer.r[adapter])].append(name)
        groups = []
        for (d_out, d_in, _r), names in sorted(buckets.items()):
            layers = [matched[n] for n in names]
            device = layers[0][0].lora_A[layers[0][1]].weight.device
            subs = [subspaces.subspaces[n] for n in names]
            m = max(s.m for s in subs)
            basis = _pad_stack([s.basis for s in subs], m).to(device)
            # The normalise multiplier goes into the stored eigenvalues: every term that uses lambda sees it.
            eig = _pad_stack([s.eigvals * self.eigenvalue_scales[n] for n, s in zip(names, subs)], m).to(device)
            task_basis = task_eig = None
            if subspaces.task_factors:
                facs = [subspaces.task_factors.get(n) for n in names]
                k = max((f.m for f in facs if f is not None), default=1)
                zero_b, zero_e = torch.zeros(d_out, k), torch.zeros(k)
                task_basis = _pad_stack([f.basis if f else zero_b.to(subs[0].basis.dtype) for f in facs], k).to(device)
                task_eig = _pad_stack([f.eigvals if f else zero_e.to(subs[0].basis.dtype) for f in facs], k).to(device)
            scales = torch.tensor([float(layer.scaling[a]) for layer, a in layers], device=device)
            in_basis = in_coef = in_sigma = None
            if self.config.alignment_input == "kfac":
                ins = [subspaces.input_factors[n] for n in names]
                k_in = max(f.m for f in ins)
                in_basis = _pad_stack([f.basis for f in ins], k_in).to(device)
                in_coef = _pad_stack([f.eigvals - f.residual for f in ins], k_in).to(device)
                in_sigma = torch.tensor([f.residual for f in ins], dtype=ins[0].basis.dtype, device=device)
            groups.append(
                _Group(
                    names,
                    layers,
                    basis,
                    eig,
                    task_basis,
                    task_eig,
                    scales,
                    d_out * d_in <= self.config.overlap_exact_max_entries,
                    torch.full((len(names),), float("nan"), device=device),
                    in_basis,
                    in_coef,
                    in_sigma,
                )
            )
        return groups

    def __call__(self) -> dict[str, torch.Tensor]:
        """The terms as scalar tensors: `alignment`, `task`, `overlap`, `geodesic` (the mean or, with
        reduction='sum', the sum over modules) and `total`."""
        sums = {k: 0.0 for k in TERM_NAMES}
        for group in self.groups:
            for key, value in self._group_terms(group).items():
                sums[key] = sums[key] + value.sum()
        divisor = self.n_modules if self.config.reduction == "mean" else 1
        terms = {k: (v / divisor if torch.is_tensor(v) else torch.tensor(0.0)) for k, v in sums.items()}
        c = self.config
        weights = {"alignment": c.lambda_a, "task": c.lambda_t, "overlap": c.lambda_nc * c.alpha}
        weights["geodesic"] = c.lambda_nc * (1 - c.alpha)
        # A term of weight 0 is only logged: detached, the backward pass skips it (and what only it uses).
        terms = {k: (v.detach() if weights[k] == 0 else v) for k, v in terms.items()}
        terms["total"] = (
            c.lambda_a * terms["alignment"]
            + c.lambda_t * terms["task"]
            + c.lambda_nc * (c.alpha * terms["overlap"] + (1 - c.alpha) * terms["geodesic"])
        )
        return terms

    def _group_terms(self, g: _Group) -> dict[str, torch.Tensor]:
        a = torch.stack([whole_weight(layer.lora_A[ad].weight) for layer, ad in g.layers])  # (G, r, d_in)
        b = torch.stack([whole_weight(layer.lora_B[ad].weight) for layer, ad in g.layers])  # (G, d_out, r)
        if g.basis.device != a.device:
            g.to_(a.device)
        # Half-precision weights are promoted to fp32 (the terms are sums of many small products);
        # float64 stays float64 so tests can compare against the dense float64 reference exactly.
        dt = torch.float64 if a.dtype == torch.float64 else torch.float32
        a, b, basis = a.to(dt), b.to(dt), g.basis.to(dt)
        s2 = g.scales.to(dt) ** 2
        gram = a @ a.transpose(1, 2)  # S = A A^T, (G, r, r)
        coef = basis.transpose(1, 2) @ b  # C = U^T B, (G, m, r)
        b_align = basis @ coef  # B_A = U C
        b_task = b - b_align  # B_T
        cs = coef @ gram
        cs_align = cs
        if g.in_basis is not None:
            # Two-sided K-FAC: S_in = A A_in A^T = sigma S + (A P) diag(rho - sigma) (A P)^T, an r x r matrix.
            ap = a @ g.in_basis.to(dt)  # (G, r, k)
            spikes = (ap * g.in_coef.to(dt)[:, None, :]) @ ap.transpose(1, 2)  # (A P) diag(rho - sigma) (A P)^T
            gram_in = g.in_sigma.to(dt)[:, None, None] * gram + spikes
            cs_align = coef @ gram_in
        out = {"alignment": s2 * (g.eigvals.to(dt)[:, :, None] * cs_align * coef).sum((1, 2))}
        bts = b_task @ gram
        if self.use_task_metric or self.geo_metric == "task_fisher":
            p_task = g.task_basis.to(dt).transpose(1, 2) @ b_task  # V^T B_T, (G, k, r)
            mu = g.task_eigvals.to(dt)[:, :, None]
            norm_t_m = s2 * (mu * (p_task @ gram) * p_task).sum((1, 2))
        norm_t_i = s2 * (bts * b_task).sum((1, 2))
        out["task"] = norm_t_m if self.use_task_metric else norm_t_i
        if self.geo_metric == "task_fisher":
            p_align = g.task_basis.to(dt).transpose(1, 2) @ b_align  # V^T B_A
            inner = s2 * (mu * (p_task @ gram) * p_align).sum((1, 2))
            norm_a = s2 * (mu * (p_align @ gram) * p_align).sum((1, 2))
            norm_t = norm_t_m
        else:
            # Literal Euclidean reading: U U^T is an orthogonal projector, so this is ~0 up to round-off.
            inner = s2 * (bts * b_align).sum((1, 2))
            norm_a = s2 * (cs * coef).sum((1, 2))
            norm_t = norm_t_i
        out["geodesic"] = inner**2 / (norm_a * norm_t + self.config.eps)
        if self.config.lambda_nc * self.config.alpha > 0:
            out["overlap"] = self._overlap(g, a, b, b_align, b_task)
        else:
            with torch.no_grad():  # weight 0: logged only, no backward through the elementwise products
                out["overlap"] = self._overlap(g, a, b, b_align, b_task)
        return out

    def _overlap(self, g: _Group, a, b, b_align, b_task) -> torch.Tensor:
        scale = g.scales.to(a.dtype)[:, None]
        if g.exact_overlap:
            dw_a = (b_align @ a).flatten(1) * scale
            dw_t = (b_task @ a).flatten(1) * scale
        else:
            # Unbiased Monte-Carlo estimate of the mean over entries from a random block of rows x columns
            # (sampled without replacement, fresh every call): every entry is equally likely to be in the block,
            # and the block is one small batched matmul whose backward is cheap, unlike a scatter of n
            # independent (i, j) picks.
            d_out, d_in, n = b.shape[1], a.shape[2], self.config.overlap_samples
            n_rows = min(d_out, max(1, math.isqrt(n * d_out // d_in)))
            n_cols = min(d_in, max(1, n // n_rows))
            rows = self._randperm(d_out, a.device)[:n_rows]
            cols = self._randperm(d_in, a.device)[:n_cols]
            a_block = a[:, :, cols]
            dw_a = (b_align[:, rows] @ a_block).flatten(1) * scale
            dw_t = (b_task[:, rows] @ a_block).flatten(1) * scale
        # eta depends on |dW| (gradients flow through it); only the running tau is detached.
        magnitude = (dw_a + dw_t).abs()
        if self.config.overlap == "literal":
            tau, temp = torch.full_like(g.tau, 0.01, dtype=a.dtype), torch.ones_like(g.tau, dtype=a.dtype)
        else:
            # tau is a detached running percentile, so a subsample of entries estimates it well enough and
            # avoids a full selection over every entry of large layers each step.
            mag = magnitude.detach()
            k = self.config.overlap_tau_samples
            if k and mag.shape[1] > k:
                mag = mag[:, self._randint(mag.shape[1], k, mag.device)]
            q = _quantile_rows(mag, self.config.overlap_quantile)
            mom = self.config.overlap_tau_momentum
            # tau starts as NaN: the first call takes the observed quantile itself (no warm-up from 0).
            g.tau = torch.where(torch.isnan(g.tau), q, mom * g.tau + (1 - mom) * q)
            tau = g.tau.to(a.dtype)
            temp = (self.config.overlap_temperature * tau).clamp_min(1e-12)
        eta = 1 + self.config.overlap_beta * torch.sigmoid((magnitude - tau[:, None]) / temp[:, None])
        return (eta * (dw_a * dw_t).abs()).mean(1)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            try:
                gen = torch.Generator(device=device)
            except RuntimeError:  # a device without generators (meta): draw on the CPU, move the indices
                gen = torch.Generator()
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def _randperm(self, n: int, device: torch.device) -> torch.Tensor:
        gen = self._generator(device)
        return torch.randperm(n, generator=gen, device=gen.device).to(device)

    def _randint(self, high: int, size: int, device: torch.device) -> torch.Tensor:
        gen = self._generator(device)
        return torch.randint(0, high, (size,), generator=gen, device=gen.device).to(device)

    @torch.no_grad()
    def module_terms(self) -> dict[str, dict[str, float]]:
        """Every module's unweighted terms as floats (a diagnostic: it synchronises and draws its own samples)."""
        out: dict[str, dict[str, float]] = {}
        saved_tau = [g.tau for g in self.groups]
        try:
            for group in self.groups:
                values = {k: v.tolist() for k, v in self._group_terms(group).items()}
                for i, name in enumerate(group.names):
                    out[name] = {k: float(v[i]) for k, v in values.items()}
        finally:
            for group, tau in zip(self.groups, saved_tau):
                group.tau = tau
        return out

    def nonfinite_modules(self) -> list[tuple[str, str]]:
        """(module, term) pairs whose value is NaN or inf: what to name when the total is not finite."""
        return [
            (name, key)
            for name, terms in self.module_terms().items()
            for key, value in terms.items()
            if not math.isfinite(value)
        ]


def _quantile_rows(x: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise quantile; kthvalue avoids torch.quantile's input-size limit on large rows."""
    k = max(1, min(x.shape[1], int(round(q * (x.shape[1] - 1))) + 1))
    return x.float().kthvalue(k, dim=1).values.to(x.dtype)


def regularization_terms(
    model: nn.Module, subspaces: AlignmentSubspaces, config: AlignGuardConfig | None = None
) -> dict[str, torch.Tensor]:
    """One-shot `AlignGuardRegularizer(model, subspaces, config)()`; build the regulariser once when training."""
    return AlignGuardRegularizer(model, subspaces, config)()


def dense_reference_terms(
    model: nn.Module, subspaces: AlignmentSubspaces, config: AlignGuardConfig | None = None
) -> dict[str, torch.Tensor]:
    """Slow, obvious float64 version of every term from materialised dW (for tests and debugging only).

    The overlap uses the exact mean with tau = the current |dW| quantile (no running average).
    """
    config = config or AlignGuardConfig()
    sums = {k: torch.zeros((), dtype=torch.float64) for k in TERM_NAMES}
    matched = {n: v for n, v in lora_modules(model).items() if n in subspaces.subspaces}
    # normalise, written out: lambda_l * (raw_trace_l / d_out_l) [* sum d_out / sum raw_trace for "global"].
    scale = dict.fromkeys(subspaces.subspaces, 1.0)
    if config.normalise != "per_layer":
        raw = subspaces.metadata["raw_traces"]
        scale = {n: raw[n] / s.basis.shape[0] for n, s in subspaces.subspaces.items()}
        if config.normalise == "global":
            total_dim = sum(s.basis.shape[0] for s in subspaces.subspaces.values())
            scale = {n: v * total_dim / sum(raw[k] for k in subspaces.subspaces) for n, v in scale.items()}
    geo = (
        config.geo_metric
        if config.geo_metric != "auto"
        else ("task_fisher" if subspaces.task_factors else "euclidean")
    )
    for name, (layer, ad) in matched.items():
        s = float(layer.scaling[ad])
        dw = s * whole_weight(layer.lora_B[ad].weight).double() @ whole_weight(layer.lora_A[ad].weight).double()
        sub = subspaces.subspaces[name]
        u, lam = sub.basis.double(), sub.eigvals.double() * scale[name]
        proj = u @ u.T
        dw_a, dw_t = proj @ dw, dw - proj @ dw
        g_align = u @ torch.diag(lam) @ u.T  # G restricted to its top-m eigenpairs
        a_in = torch.eye(dw.shape[1], dtype=torch.float64)
        if config.alignment_input == "kfac":
            f = subspaces.input_factors[name]
            p = f.basis.double()
            a_in = p @ torch.diag(f.eigvals.double()) @ p.T + f.residual * (a_in - p @ p.T)
        sums["alignment"] += torch.trace(dw_a.T @ g_align @ dw_a @ a_in)
        if subspaces.task_factors:
            tf = subspaces.task_factors[name]
            g_task = tf.basis.double() @ torch.diag(tf.eigvals.double()) @ tf.basis.double().T
        h = g_task if config.task_metric == "task_fisher" else torch.eye(dw.shape[0], dtype=torch.float64)
        sums["task"] += torch.trace(dw_t.T @ h @ dw_t)
        metric = g_task if geo == "task_fisher" else torch.eye(dw.shape[0], dtype=torch.float64)
        inner = torch.trace(dw_a.T @ metric @ dw_t)
        norms = torch.trace(dw_a.T @ metric @ dw_a) * torch.trace(dw_t.T @ metric @ dw_t)
        sums["geodesic"] += inner**2 / (norms + config.eps)
        mag = dw.abs().flatten()
        if config.overlap == "literal":
            tau, temp = 0.01, 1.0
        else:
            tau = float(_quantile_rows(mag.detach()[None], config.overlap_quantile)[0])
            temp = max(config.overlap_temperature * tau, 1e-12)
        eta = 1 + config.overlap_beta * torch.sigmoid((mag - tau) / temp)
        sums["overlap"] += (eta * (dw_a.flatten() * dw_t.flatten()).abs()).mean()
    terms = {k: v / (len(matched) if config.reduction == "mean" else 1) for k, v in sums.items()}
    c = config
    terms["total"] = (
        c.lambda_a * terms["alignment"]
        + c.lambda_t * terms["task"]
        + c.lambda_nc * (c.alpha * terms["overlap"] + (1 - c.alpha) * terms["geodesic"])
    )
    return terms


def alignment_fraction(model, subspaces: AlignmentSubspaces) -> float:
    """||dW_A|| / ||dW|| over all LoRA modules with a subspace (Frobenius, summed squares); a diagnostic."""
    num = den = 0.0
    with torch.no_grad():
        for name, (layer, ad) in lora_modules(model).items():
            sub = subspaces.subspaces.get(name)
            if sub is None:
                continue
            b, a = whole_weight(layer.lora_B[ad].weight), whole_weight(layer.lora_A[ad].weight)
            dw = float(layer.scaling[ad]) * b.double() @ a.double()
            u = sub.basis.double().to(dw.device)
            num += float((u.T @ dw).square().sum())
            den += float(dw.square().sum())
    return (num / den) ** 0.5 if den > 0 else 0.0
