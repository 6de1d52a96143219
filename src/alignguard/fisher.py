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
  keeps its own token count, so the normalisation stays exact.
- `input_factor=True` also accumulates the input side A_l = E[x_t x_t^T] of the two-sided K-FAC factor G_l (x) A_l
  from the module inputs at the same positions (a forward hook; no extra backward work), normalised the same way.
- Distributed runs (torch.distributed initialised) all-reduce the sums, traces and counts before
  normalisation; each rank must see its own shard of the data, every token on exactly one rank
  (`alignguard.distributed.shard_batches`; a DataLoader prepared by an `Accelerator` needs `even_batches=False`,
  else samples are repeated to even out the last batch and counted twice).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .config import FisherConfig
from .data import IGNORE_INDEX
from .distributed import is_dtensor
from .fingerprint import architecture_fingerprint
from .io import atomic_save_file, atomic_write_json, package_versions
from .sketch import NystromSketch
from .targets import find_target_modules, layer_dims

FISHER_WEIGHTS = "fisher.safetensors"
FISHER_META = "fisher.json"


class FisherMismatchError(ValueError):
    """A cached Fisher state was made for a different model or configuration."""


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
        metadata: model fingerprint, data hash, config, package versions, skip counts.
    """

    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    input_factors: dict[str, torch.Tensor] = field(default_factory=dict)
    input_low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)
    token_counts: dict[str, int] = field(default_factory=dict)
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
        meta = dict(self.metadata)
        meta["dims"] = {n: list(d) for n, d in self.dims.items()}
        meta["token_counts"] = self.token_counts
        atomic_write_json(directory / FISHER_META, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path, model=None, config: FisherConfig | None = None) -> FisherState:
        """Load a saved state; with `model`/`config`, refuse one made for a different model or config.

        Raises:
            FileNotFoundError: if the files are missing.
            FisherMismatchError: if module names/shapes or the estimation config differ.
        """
        directory = Path(directory)
        meta_path, weights_path = directory / FISHER_META, directory / FISHER_WEIGHTS
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no Fisher cache here; run `alignguard fisher` to create it")
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights_path))
        state = cls(metadata=meta)
        state.dims = {n: tuple(d) for n, d in meta.pop("dims").items()}
        state.token_counts = meta.pop("token_counts")
        for name in state.dims:
            if f"{name}.factor" in tensors:
                state.factors[name] = tensors[f"{name}.factor"]
            else:
                state.low_rank[name] = (tensors[f"{name}.eigvals"], tensors[f"{name}.eigvecs"])
            if f"{name}.input_factor" in tensors:
                state.input_factors[name] = tensors[f"{name}.input_factor"]
            elif f"{name}.input_eigvals" in tensors:
                state.input_low_rank[name] = (tensors[f"{name}.input_eigvals"], tensors[f"{name}.input_eigvecs"])
        if model is not None:
            state.check_model(model, source=str(directory))
        if config is not None:
            saved = meta.get("config", {})
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
        """Raise `FisherMismatchError` unless every module of this state exists in `model` with the same shape."""
        fingerprint = architecture_fingerprint(model)
        if self.metadata.get("model_fingerprint") not in (None, fingerprint):
            modules = find_target_modules(model)
            missing = [n for n in self.dims if n not in modules]
            shapes = {n: (self.dims[n], layer_dims(_base(modules[n]))) for n in self.dims if n in modules}
            bad = {n: s for n, s in shapes.items() if tuple(s[0]) != tuple(s[1])}
            raise FisherMismatchError(
                f"{source} was made for a different model (architecture fingerprint "
                f"{self.metadata.get('model_fingerprint')} != {fingerprint}; model "
                f"{self.metadata.get('model_id')!r}). Missing modules: {missing[:5]}; shape differences: "
                f"{dict(list(bad.items())[:5])}. Re-run `alignguard fisher` for this model."
            )


def _base(module):
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose output predicts a response token (labels shifted by one)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


class _Accumulator:
    """Sums g g^T (dense) or a Nystrom sketch per module, with per-module token counts and skip counts."""

    def __init__(self, dims: dict[str, tuple[int, int]], config: FisherConfig, device):
        self.config = config
        self.sums, self.sketches = {}, {}
        for name, (d_out, _) in dims.items():
            if config.fisher_storage == "dense":
                self.sums[name] = torch.zeros(d_out, d_out, dtype=torch.float32, device=device)
            else:
                self.sketches[name] = NystromSketch(d_out, config.sketch_rank, seed=config.label_seed, device=device)
        self.counts = dict.fromkeys(dims, 0)
        self.skipped = dict.fromkeys(dims, 0)
        self.positions: torch.Tensor | None = None

    def add(self, name: str, rows: torch.Tensor) -> None:
        """Add sum_t v_t v_t^T for the rows v_t of `rows` taken at `self.positions` (gradients or inputs)."""
        if self.positions is None:  # a lockstep pass that only keeps FSDP2's collectives in step
            return
        g = rows[self.positions].float()
        if not torch.isfinite(g).all():
            self.skipped[name] += 1
            return
        if self.config.fisher_storage == "dense":
            self.sums[name].addmm_(g.T, g)
        else:
            self.sketches[name].update(g)
        self.counts[name] += g.shape[0]

    def hook_for(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            self.add(name, grad)

        return hook

    def normalised(self, name: str, dim: int):
        """The mean, trace-normalised to `dim`: a dense matrix, or (eigenvalues, eigenvectors) of the sketch."""
        if self.config.fisher_storage == "dense":
            g = self.sums[name] / self.counts[name]
            return (g * (dim / g.trace().clamp_min(1e-30))).cpu()
        sk = self.sketches[name]
        eig, vec = sk.eigh()
        return (eig * (dim / float(sk.trace))).cpu(), vec.cpu()


def estimate_fisher(model, data, config: FisherConfig | None = None, model_id: str | None = None) -> FisherState:
    """Estimate normalised output-side Fisher factors of `model` on alignment `data`.

    Args:
        model: a `transformers` causal LM, before or after `get_peft_model`.
        data: an iterable of batches, each a dict with `input_ids`, `attention_mask` and `labels` (-100 on
            prompt and padding tokens), e.g. from `alignguard.data.make_batches`.
        config: `FisherConfig`.
        model_id: a name or path recorded in the metadata.

    Returns:
        A `FisherState`. The model's parameters, `requires_grad` flags, `.grad` and train/eval mode are left
        as they were; all hooks are removed, also when an error is raised.

    Raises:
        ValueError: empty data, no response tokens at all, or target modules that match nothing / are quantised.
    """
    config = config or FisherConfig()
    modules = find_target_modules(model, config.fisher_modules)
    dims = {n: layer_dims(_base(m)) for n, m in modules.items()}
    device = next(model.parameters()).device
    acc = _Accumulator(dims, config, device)
    # Input side of the two-sided K-FAC factor (A_in = E[x x^T] at the same positions), when asked for.
    acc_in = None
    if config.input_factor:  # only then: dense input factors are as large as the output ones
        acc_in = _Accumulator({n: (d_in, d_out) for n, (d_out, d_in) in dims.items()}, config, device)
    gen = torch.Generator(device=device).manual_seed(config.label_seed)

    # FSDP2 (DTensor parameters): every forward and backward is a collective, so all ranks must run the same
    # number of batches through the model, including batches that contribute nothing.
    lockstep = any(is_dtensor(p) for p in model.parameters())
    if lockstep:
        _check_lockstep_batches(data, config, device)
    handles = []
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    n_batches = n_empty = n_nonfinite_loss = 0
    data_hash = hashlib.sha256()

    def _out_hook(name):
        def fwd_hook(_mod, inp, out):
            if acc_in is not None:
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
        model.eval()  # dropout off: the factor describes the deterministic model
        handles.append(model.get_input_embeddings().register_forward_hook(_embed_hook))
        for name, module in modules.items():
            handles.append(module.register_forward_hook(_out_hook(name)))
        total = len(data) if hasattr(data, "__len__") else None
        if config.max_batches is not None and total is not None:
            total = min(total, config.max_batches)
        bar = tqdm(data, total=total, desc="Fisher", unit="batch", disable=not config.show_progress)
        for i, batch in enumerate(bar):
            if config.max_batches is not None and i >= config.max_batches:
                break
            n_batches += 1
            labels = batch["labels"].to(device)
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
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            if not empty:
                data_hash.update(inputs["input_ids"].cpu().numpy().tobytes())
            logits = model(**inputs).logits
            if empty:  # lockstep: join the other ranks' forward/backward collectives, accumulate nothing
                logits.backward(torch.zeros_like(logits))
                continue
            sel = logits[positions].float()
            if config.fisher_labels == "sampled":
                with torch.no_grad():
                    probs = torch.softmax(sel, dim=-1)
                    targets = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            else:
                targets = labels[:, 1:][positions[:, :-1]]
            loss = torch.nn.functional.cross_entropy(sel, targets, reduction="sum")
            if not torch.isfinite(loss):
                n_nonfinite_loss += 1
                if lockstep:
                    acc.positions = None
                    logits.backward(torch.zeros_like(logits))
                continue
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
        torch.backends.cuda.matmul.allow_tf32 = old_tf32

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
        (state.factors if config.fisher_storage == "dense" else state.low_rank)[name] = acc.normalised(name, d_out)
        if acc_in is not None:
            if acc_in.counts[name] == 0:
                raise ValueError(f"estimate_fisher: module {name!r} received no finite input; no input factor")
            (state.input_factors if config.fisher_storage == "dense" else state.input_low_rank)[name] = (
                acc_in.normalised(name, d_in)
            )
    state.metadata = {
        "model_id": model_id or getattr(getattr(model, "config", None), "_name_or_path", None),
        "model_fingerprint": architecture_fingerprint(model),
        "data_hash": data_hash.hexdigest()[:16],
        "config": {k: v for k, v in config.to_dict().items() if k != "show_progress"},
        "n_batches": n_batches,
        "n_empty_batches": n_empty,
        "n_nonfinite_loss_batches": n_nonfinite_loss,
        "skipped_module_batches": skipped,
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


def _all_reduce(acc: _Accumulator, batch_counts: tuple[int, ...] = ()) -> tuple[int, ...]:
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
