"""Output-side K-FAC Fisher factors on alignment data (AlignGuard-LoRA, arXiv 2508.02079; docs/design.md §3).

For every target module l with output y in R^{d_out}, accumulate G_l = (1/N_l) sum_t g_t g_t^T over response
positions t, where g_t = dL/dy_t is the back-propagated gradient at position t of the summed negative
log-likelihood of the response tokens (sampled labels: the true Fisher; empirical labels: the data). Then
G_l <- G_l / (tr(G_l)/d_out), so every layer has mean eigenvalue 1 and lambda_A means the same everywhere.

Design decisions:
- Gradients are captured with a tensor hook on the module *output* (registered from a forward hook), which
  equals the grad_output a full backward hook on the LoRA wrapper would see, and needs no weight gradients:
  the pass temporarily freezes every parameter and asks for gradients of the embedding output instead, so no
  `.grad` of the user's model is touched and no weight-gradient matmuls are spent. Works before and after
  `get_peft_model` (the LoRA branch at B = 0 adds nothing to y).
- Non-finite gradients skip that module's contribution for that batch (counted, warned), and every module
  keeps its own token count, so the normalisation stays exact. A module with tr G = 0 (its output does not
  affect the loss) keeps an all-zero factor and raw trace 0 (warned); its subspace is empty (m = 0).
- The raw trace tr((1/N) sum g g^T) of every module is kept (`raw_traces`), so the normalisation can be undone
  (`alignguard.subspace.eigenvalue_scales`).
- The pass runs the model as it is, in train mode if it is training (dropout off through `dropout_disabled`, not
  `eval()`, so gradient checkpointing stays on), with `use_cache=False` and `position_ids` from the attention mask
  (left padding gives the same factor); each module's sum lives on that module's device.
- fisher.json records `architecture_fingerprint` (names and shapes; also under its older name `model_fingerprint`),
  `architecture` (canonical parameter name -> shape, to say what differs) and `base_weights_fingerprint`
  (values, LoRA skipped); `check_model` refuses another architecture or other base weights. Loading checks every
  tensor (`alignguard.factor_checks`) and raises `FisherFileError` for a bad file.
- `input_factor=True` also accumulates the input side A_l = E[x_t x_t^T] of the two-sided K-FAC factor G_l (x) A_l
  from the module inputs at the same positions (a forward hook; no extra backward work), normalised the same way.
- Distributed runs (torch.distributed initialised) all-reduce the sums, traces and counts before
  normalisation; each rank must see its own shard of the data, every token on exactly one rank
  (`alignguard.distributed.shard_batches`; a DataLoader prepared by an `Accelerator` needs `even_batches=False`,
  else samples are repeated to even out the last batch and counted twice).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import factor_checks as checks
from .accumulator import FactorAccumulator
from .config import FisherConfig
from .data import IGNORE_INDEX
from .distributed import is_dtensor
from .factor_checks import FisherFileError, FisherMismatchError
from .fingerprint import architecture_fingerprint, architecture_shapes, base_weights_fingerprint
from .io import atomic_save_file, atomic_write_json, package_versions
from .label_sampling import sample_categorical
from .model_pass import dropout_disabled, forward_accepts, module_device, position_ids_from_mask
from .targets import canonical_name, find_target_modules, layer_dims

FISHER_WEIGHTS = "fisher.safetensors"
FISHER_META = "fisher.json"
# Bumped when fisher.json changes meaning; 2 = base-weights fingerprint, raw traces, architecture shapes.
FISHER_FORMAT = 2

__all__ = ["FisherFileError", "FisherMismatchError", "FisherState", "estimate_fisher", "load_fisher", "save_fisher"]


@dataclass
class FisherState:
    """Per-module Fisher factors, normalised to mean eigenvalue 1.

    Attributes:
        factors: canonical module name -> dense d_out x d_out factor (fisher_storage="dense").
        low_rank: canonical module name -> (eigenvalues [k], eigenvectors [d_out, k]) (fisher_storage="sketch").
        input_factors: canonical module name -> dense d_in x d_in input factor A_in = E[x x^T] over the same
            response positions, normalised to mean eigenvalue 1 (`input_factor=True`, fisher_storage="dense").
        input_low_rank: the same as (eigenvalues, eigenvectors) (`input_factor=True`, fisher_storage="sketch").
        dims: canonical module name -> (d_out, d_in).
        token_counts: response tokens that contributed to each module.
        raw_traces: trace of each module's un-normalised per-token mean factor (1/N) sum_t g_t g_t^T, before the
            trace normalisation (0 for a module whose output gradient is zero: its factor is all zero).
        metadata: fingerprints, data hash, config, package versions, skip counts.
    """

    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    input_factors: dict[str, torch.Tensor] = field(default_factory=dict)
    input_low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)
    token_counts: dict[str, int] = field(default_factory=dict)
    raw_traces: dict[str, float] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def module_names(self) -> list[str]:
        return sorted(self.dims)

    def save(self, directory: str | Path) -> Path:
        """Write `fisher.safetensors` + `fisher.json` into `directory` (atomically)."""
        directory = Path(directory)
        tensors = {f"{n}.factor": f.contiguous() for n, f in self.factors.items()}
        for n, (eig, vec) in self.low_rank.items():
            tensors[f"{n}.eigvals"] = eig.contiguous()
            tensors[f"{n}.eigvecs"] = vec.contiguous()
        tensors.update({f"{n}.input_factor": f.contiguous() for n, f in self.input_factors.items()})
        for n, (eig, vec) in self.input_low_rank.items():
            tensors[f"{n}.input_eigvals"] = eig.contiguous()
            tensors[f"{n}.input_eigvecs"] = vec.contiguous()
        atomic_save_file({k: v.detach().cpu() for k, v in tensors.items()}, directory / FISHER_WEIGHTS)
        meta = {"format_version": FISHER_FORMAT, **self.metadata}
        meta["dims"] = {n: list(d) for n, d in self.dims.items()}
        meta["token_counts"] = self.token_counts
        if self.raw_traces:
            meta["raw_traces"] = self.raw_traces
        atomic_write_json(directory / FISHER_META, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path, model=None, config: FisherConfig | None = None) -> FisherState:
        """Load a saved state; with `model`/`config`, refuse one made for a different model or config.

        Every tensor is checked (finite, PSD, trace-normalised, orthonormal eigenvectors, shapes as in fisher.json);
        `config` and the fingerprints are required when `config` / `model` are given.

        Raises:
            FileNotFoundError: if the files are missing.
            FisherMismatchError: if module names/shapes, the weights or the estimation config differ.
            FisherFileError (a FisherMismatchError): if a file is unreadable, incomplete or corrupt.
        """
        directory = Path(directory)
        meta_path, weights_path = directory / FISHER_META, directory / FISHER_WEIGHTS
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no Fisher cache here; run `alignguard fisher` to create it")
        meta = checks.read_json(meta_path)
        checks.reject_old_config(meta_path, meta.get("config"), checks.OLD_FISHER_KEYS)
        state = cls(metadata=meta)
        state.dims = checks.read_dims(meta_path, checks.require(meta_path, meta, "dims", dict))
        state.token_counts = checks.require(meta_path, meta, "token_counts", dict)
        meta.pop("dims"), meta.pop("token_counts")
        if set(state.token_counts) != set(state.dims) or not all(
            isinstance(c, int) and c >= 0 for c in state.token_counts.values()
        ):
            checks.fail(meta_path, "field 'token_counts' must give a count >= 0 for every module in 'dims'")
        if "raw_traces" in meta:
            state.raw_traces = meta.pop("raw_traces")
            checks.check_raw_traces(meta_path, state.raw_traces, state.dims)
        tensors = checks.read_tensors(weights_path)
        checks.fill_fisher_tensors(state, tensors, weights_path, meta_path)
        if model is not None:
            state.check_model(model, source=str(meta_path))
        if config is not None:
            saved = checks.require(meta_path, meta, "config", dict)
            ours = {k: v for k, v in config.to_dict().items() if k != "show_progress"}
            # A field added after the cache was written counts as its default (older caches stay usable).
            defaults = FisherConfig().to_dict()
            diff = {k: (saved.get(k, defaults[k]), v) for k, v in ours.items() if saved.get(k, defaults[k]) != v}
            if diff:
                raise FisherMismatchError(
                    f"{directory}: the Fisher cache was estimated with a different config "
                    f"(field: (cached, requested)) {diff}; delete the cache or use the same settings"
                )
        return state

    def check_model(self, model, source: str = "Fisher state") -> None:
        """Raise `FisherMismatchError` unless this state was estimated on `model`'s architecture and base weights.

        The message lists exactly what differs: parameters present in one model but not the other and shape
        differences (canonical names), and the estimated modules that `model` lacks or has with another shape.
        """
        arch = self.metadata.get("architecture_fingerprint", self.metadata.get("model_fingerprint"))
        weights = self.metadata.get("base_weights_fingerprint")
        if arch is None or weights is None:
            missing = "architecture_fingerprint" if arch is None else "base_weights_fingerprint"
            checks.fail(source, f"field {missing!r} is missing or null (written by an older alignguard?)")
        fingerprint = architecture_fingerprint(model)
        if arch != fingerprint:
            raise FisherMismatchError(
                f"{source} was made for a different model (architecture fingerprint {arch} != {fingerprint}; "
                f"model {self.metadata.get('model_id')!r}). {self._architecture_diff(model)} "
                "Re-run `alignguard fisher` for this model."
            )
        ours = base_weights_fingerprint(model)
        if weights != ours:
            raise FisherMismatchError(
                f"{source} was estimated on other weights of the same architecture (base-weights fingerprint "
                f"{weights} != {ours}; model {self.metadata.get('model_id')!r}): its factors are not this model's. "
                "Re-run `alignguard fisher` for this model."
            )

    def _architecture_diff(self, model) -> str:
        parts = []
        saved = self.metadata.get("architecture")
        if isinstance(saved, dict):
            here = architecture_shapes(model)
            only_saved = sorted(set(saved) - set(here))
            only_here = sorted(set(here) - set(saved))
            shapes = {
                n: (list(saved[n]), here[n]) for n in sorted(set(saved) & set(here)) if list(saved[n]) != here[n]
            }
            parts.append(
                f"Parameters only in the Fisher state's model: {_few(only_saved)}; only in this model: "
                f"{_few(only_here)}; shape differences (saved, this model): {_few(shapes)}."
            )
        modules = {canonical_name(n): m for n, m in model.named_modules()}
        absent = [n for n in self.module_names if n not in modules]
        shapes = {}
        for n in self.module_names:
            if n in modules and hasattr(_base(modules[n]), "weight"):
                here_dims = tuple(layer_dims(_base(modules[n])))
                if tuple(self.dims[n]) != here_dims:
                    shapes[n] = (list(self.dims[n]), list(here_dims))
        if absent or shapes:
            parts.append(
                f"Estimated modules missing here: {_few(absent)}; with another (d_out, d_in): {_few(shapes)}."
            )
        else:
            parts.append("The estimated modules exist here with the same (d_out, d_in).")
        return " ".join(parts)


def _few(items, k: int = 8) -> str:
    """At most `k` entries of a list or dict, with the total when some are left out."""
    seq = list(items.items()) if isinstance(items, dict) else list(items)
    shown = dict(seq[:k]) if isinstance(items, dict) else seq[:k]
    return f"{shown}" + (f" (+{len(seq) - k} more)" if len(seq) > k else "")


def _base(module):
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose output predicts a response token (labels shifted by one)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


# The name benchmarks/sketch_memory.py imports.
_Accumulator = FactorAccumulator


def estimate_fisher(model, data, config: FisherConfig | None = None, model_id: str | None = None) -> FisherState:
    """Estimate normalised output-side Fisher factors of `model` on alignment `data`.

    Args:
        model: a `transformers` causal LM, before or after `get_peft_model`, on one device or dispatched over
            several (`device_map`).
        data: an iterable of batches, each a dict with `input_ids`, `attention_mask` and `labels` (-100 on
            prompt and padding tokens), e.g. from `alignguard.data.make_batches`; left or right padded.
        config: `FisherConfig`.
        model_id: a name or path recorded in the metadata.

    Returns:
        A `FisherState`. The model's parameters, `requires_grad` flags, `.grad`, train/eval flags and dropout
        rates are left as they were; all hooks are removed, also when an error is raised. A module whose output
        gradient is zero on this data (tr G = 0) gets an all-zero factor and raw trace 0, with a warning.

    Raises:
        ValueError: empty data, no response tokens at all, or target modules that match nothing / are quantised.
    """
    config = config or FisherConfig()
    modules = find_target_modules(model, config.fisher_modules)
    dims = {n: layer_dims(_base(m)) for n, m in modules.items()}
    first = module_device(model, torch.device("cpu"))  # the first device with real (not offloaded) weights
    devices = {n: module_device(m) for n, m in modules.items()}
    acc = FactorAccumulator(dims, config, dict(devices))
    # Input side of the two-sided K-FAC factor (A_in = E[x x^T] at the same positions), when asked for.
    acc_in = None
    if config.input_factor:  # only then: dense input factors are as large as the output ones
        acc_in = FactorAccumulator({n: (d_in, d_out) for n, (d_out, d_in) in dims.items()}, config, dict(devices))
    input_device = module_device(model.get_input_embeddings(), first)
    generators: dict[torch.device, torch.Generator] = {}  # label sampler, on the device of the logits
    pass_positions = forward_accepts(model, "position_ids")
    # Logits only at the sequence positions some row needs: the lm_head (often the largest matmul) and its
    # backward skip the prompt columns; the selected logits are the same numbers.
    pass_keep = forward_accepts(model, "logits_to_keep")

    # FSDP2 (DTensor parameters): every forward and backward is a collective, so all ranks must run the same
    # number of batches through the model, including batches that contribute nothing.
    lockstep = any(is_dtensor(p) for p in model.parameters())
    if lockstep:
        _check_lockstep_batches(data, config, first)
    handles = []
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    n_batches = n_empty = n_nonfinite_loss = 0
    data_hash = hashlib.sha256()
    inputs_seen: set[str] = set()  # modules whose inputs this batch has added (a checkpointed layer runs twice)

    def _out_hook(name):
        def fwd_hook(_mod, inp, out):
            if acc_in is not None and name not in inputs_seen:
                inputs_seen.add(name)
                with torch.no_grad():
                    acc_in.add(name, inp[0])
            tensor = out[0] if isinstance(out, tuple) else out
            if tensor.requires_grad:
                tensor.register_hook(acc.hook_for(name))

        return fwd_hook

    def _embed_hook(_mod, _inp, out):
        return out.requires_grad_(True)

    try:
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        for p in model.parameters():
            p.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(_embed_hook))
        for name, module in modules.items():
            handles.append(module.register_forward_hook(_out_hook(name)))
        total = len(data) if hasattr(data, "__len__") else None
        if config.max_batches is not None and total is not None:
            total = min(total, config.max_batches)
        bar = tqdm(data, total=total, desc="Fisher", unit="batch", disable=not config.show_progress)
        with dropout_disabled(model):  # the factor describes the deterministic model
            for i, batch in enumerate(bar):
                if config.max_batches is not None and i >= config.max_batches:
                    break
                n_batches += 1
                labels = batch["labels"]
                data_hash.update(labels.cpu().numpy().tobytes())
                positions = _response_positions(labels)
                empty = not positions.any()
                if empty:
                    n_empty += 1
                    if not lockstep:
                        continue
                acc.positions = None if empty else positions
                if acc_in is not None:
                    acc_in.positions = acc.positions
                inputs_seen.clear()
                inputs = {k: v.to(input_device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                if not empty:
                    data_hash.update(inputs["input_ids"].cpu().numpy().tobytes())
                if pass_positions and "attention_mask" in inputs:
                    inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
                columns = None
                if pass_keep and not empty:
                    # On the CPU: a CPU index can slice the last hidden state on whichever device it lives.
                    columns = positions.any(0).nonzero().squeeze(1).cpu()
                    if len(columns) < positions.shape[1]:
                        inputs["logits_to_keep"] = columns
                    else:
                        columns = None
                logits = model(**inputs, use_cache=False).logits
                if empty:  # lockstep: join the other ranks' forward/backward collectives, accumulate nothing
                    logits.backward(torch.zeros_like(logits))
                    continue
                positions = positions.to(logits.device)
                kept = positions if columns is None else positions[:, columns.to(positions.device)]
                sel = logits[kept].float()
                with torch.no_grad():
                    probs = torch.softmax(sel, dim=-1)
                    if config.fisher_labels == "sampled":
                        if logits.device not in generators:
                            generators[logits.device] = torch.Generator(logits.device).manual_seed(config.label_seed)
                        targets = sample_categorical(probs, generators[logits.device])
                    else:
                        targets = labels.to(logits.device)[:, 1:][positions[:, :-1]]
                    # The summed cross-entropy, only to check it is finite (its gradient is formed below).
                    loss = (torch.logsumexp(sel, -1) - sel.gather(1, targets[:, None]).squeeze(1)).sum()
                if not torch.isfinite(loss):
                    n_nonfinite_loss += 1
                    if lockstep:
                        acc.positions = None
                        logits.backward(torch.zeros_like(logits))
                    continue
                # d(sum_t CE_t)/d logits = softmax - onehot(targets), from the sampler's softmax: no log-softmax
                # forward and backward through autograd.
                probs[torch.arange(len(targets), device=probs.device), targets] -= 1.0
                sel.backward(probs)
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        torch.backends.cuda.matmul.allow_tf32 = old_tf32

    # Modules that saw nothing on this rank still need a sum for the collectives.
    for a in (acc, acc_in) if acc_in is not None else (acc,):
        for name in dims:
            a.allocate(name, a.devices.get(name) or first)
    # Reduce before the emptiness check: a rank whose shard is empty must still join the collectives.
    n_batches, n_empty, n_nonfinite_loss = _all_reduce(acc, (n_batches, n_empty, n_nonfinite_loss))
    if acc_in is not None:
        _all_reduce(acc_in)
    if n_batches == 0:
        raise ValueError("estimate_fisher: the data is empty (no batches); pass at least one batch of alignment data")
    if sum(acc.counts.values()) == 0:
        raise ValueError(
            f"estimate_fisher: no response tokens in {n_batches} batches (every label is -100, or every gradient "
            "was non-finite); mask only the prompt tokens with -100 and keep the response labels"
        )
    skipped = {n: c for n, c in acc.skipped.items() if c}
    if skipped or n_nonfinite_loss:
        warnings.warn(
            f"estimate_fisher: skipped {n_nonfinite_loss} batches with a non-finite loss and non-finite gradients "
            f"in {sum(skipped.values())} module-batches ({dict(list(skipped.items())[:5])}); the factors use "
            "the remaining tokens. Check the data or estimate in float32.",
            stacklevel=2,
        )
    if n_empty:
        warnings.warn(f"estimate_fisher: {n_empty} batches had no response tokens and were skipped", stacklevel=2)

    state = FisherState(dims=dims, token_counts={n: int(c) for n, c in acc.counts.items()})
    for name, (d_out, d_in) in dims.items():
        if acc.counts[name] == 0:
            raise ValueError(f"estimate_fisher: module {name!r} received no finite gradient; cannot build its factor")
        state.raw_traces[name] = acc.raw_trace(name)
        (state.factors if config.fisher_storage == "dense" else state.low_rank)[name] = acc.normalised(name, d_out)
        if acc_in is not None:
            if acc_in.counts[name] == 0:
                raise ValueError(f"estimate_fisher: module {name!r} received no finite input; no input factor")
            (state.input_factors if config.fisher_storage == "dense" else state.input_low_rank)[name] = (
                acc_in.normalised(name, d_in)
            )
    zero = sorted(n for n, t in state.raw_traces.items() if t == 0.0)
    if zero:
        warnings.warn(
            f"estimate_fisher: {len(zero)} modules have an all-zero output gradient on this data (tr G = 0: they do "
            f"not affect the loss): {_few(zero)}; their factor is zero and their alignment subspace will be empty "
            "(m = 0), so AlignGuard leaves them unconstrained",
            stacklevel=2,
        )
    arch = architecture_fingerprint(model)
    state.metadata = {
        "model_id": model_id or getattr(getattr(model, "config", None), "_name_or_path", None),
        "architecture_fingerprint": arch,
        "model_fingerprint": arch,  # the same value under its pre-format-2 name, for readers of older files
        "base_weights_fingerprint": base_weights_fingerprint(model),
        "architecture": architecture_shapes(model),
        "data_hash": data_hash.hexdigest()[:16],
        "config": {k: v for k, v in config.to_dict().items() if k != "show_progress"},
        "n_batches": n_batches,
        "n_empty_batches": n_empty,
        "n_nonfinite_loss_batches": n_nonfinite_loss,
        "skipped_module_batches": skipped,
        "zero_gradient_modules": zero,
        "versions": package_versions(),
    }
    return state


def _check_lockstep_batches(data, config: FisherConfig, device: torch.device) -> None:
    """Raise unless every rank will run the same number of batches (needed when FSDP2 shards the model)."""
    if not hasattr(data, "__len__"):
        raise ValueError(
            "estimate_fisher: the model is sharded by FSDP2, so every rank must run the same number of batches; "
            "pass the data as a list (e.g. shard_batches(batches)) so the counts can be checked"
        )
    n = len(data) if config.max_batches is None else min(len(data), config.max_batches)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    counts = torch.tensor([n, -n], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
    if int(counts[0]) != -int(counts[1]):
        raise ValueError(
            f"estimate_fisher: the model is sharded by FSDP2 and the ranks have between {-int(counts[1])} and "
            f"{int(counts[0])} batches (this rank: {n}); every rank must run the same number, or the collectives "
            "hang. Make the number of batches a multiple of the world size before shard_batches, or estimate "
            "on the unwrapped model (docs/distributed.md)."
        )


def _all_reduce(acc: FactorAccumulator, batch_counts: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Sum factor sums / sketches, token counts and `batch_counts` over processes (no-op without
    torch.distributed); returns the summed `batch_counts`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return batch_counts
    if torch.distributed.get_world_size() == 1:
        return batch_counts
    reduce = torch.distributed.all_reduce
    device = next(iter(acc.sums.values())).device if acc.sums else next(iter(acc.sketches.values())).y.device
    totals = torch.tensor(batch_counts, dtype=torch.float64, device=device)
    if batch_counts:
        reduce(totals)
    for name in acc.counts:
        if acc.config.fisher_storage == "dense":
            reduce(acc.sums[name])
        else:
            reduce(acc.sketches[name].y)
            reduce(acc.sketches[name].trace)
        count = torch.tensor(
            [acc.counts[name], acc.skipped[name]],
            dtype=torch.float64,
            device=acc.sums[name].device if acc.sums else acc.sketches[name].y.device,
        )
        reduce(count)
        acc.counts[name], acc.skipped[name] = int(count[0].item()), int(count[1].item())
    return tuple(int(v) for v in totals.tolist())


def save_fisher(state: FisherState, directory: str | Path) -> Path:
    """Write a `FisherState` to `directory` (see `FisherState.save`)."""
    return state.save(directory)


def load_fisher(directory: str | Path, model=None, config: FisherConfig | None = None) -> FisherState:
    """Load a `FisherState`, checking it against `model` and `config` when given (see `FisherState.load`)."""
    return FisherState.load(directory, model=model, config=config)
