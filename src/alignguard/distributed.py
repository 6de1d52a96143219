"""Helpers for multi-process runs (docs/design.md §3 "Distributed"; see docs/distributed.md).

The Fisher pass needs each token on exactly one rank: `estimate_fisher` all-reduces the sums of g g^T (or the
sketches Y = G Omega), the traces and the token counts before normalising, so the result equals the one-process
result over the union of the shards. `shard_batches` gives such a split for a list of pre-made batches (e.g.
from `alignguard.data.make_batches`). A `torch.utils.data.DataLoader` passed through `accelerator.prepare` is
sharded by accelerate, but only `Accelerator(even_batches=False)` keeps every token on one rank: the default
repeats samples from the start to even out the last batch, which would count them twice.

    from alignguard.distributed import shard_batches
    state = estimate_fisher(model, shard_batches(batches), FisherConfig(fisher_labels="empirical"))
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

try:  # FSDP2 parameters; torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in a run.

    Attributes:
        rank: global rank (0 without torch.distributed).
        world_size: number of processes (1 without torch.distributed).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info() -> RankInfo:
    """Rank and world size of the initialised default process group, or (0, 1) when there is none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return RankInfo(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return RankInfo()


def shard_batches(batches: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's share of `batches`: every `world_size`-th batch starting at `rank` (round robin).

    Round robin gives each batch (hence each token) to exactly one rank and keeps the shares within one batch
    of each other. Uneven splits are fine for the Fisher pass, because it sums token counts across ranks
    rather than averaging per-rank means; a rank may even get no batch at all.

    Args:
        batches: a sequence (list) of batches; iterables without `len` must be materialised first.
        rank: this process's rank (default: from the initialised process group, else 0).
        world_size: number of processes (default: from the initialised process group, else 1).

    Raises:
        ValueError: if `rank` is not in [0, world_size).
    """
    info = rank_info()
    rank = info.rank if rank is None else rank
    world_size = info.world_size if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_batches: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(batches)[rank::world_size]


def regularizer_parameters(regularizer) -> list[torch.nn.Parameter]:
    """The lora_A / lora_B weights an `AlignGuardRegularizer` reads, in group order."""
    return [
        module[adapter].weight
        for group in regularizer.groups
        for layer, adapter in group.layers
        for module in (layer.lora_A, layer.lora_B)
    ]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a `DTensor` (how FSDP2 holds sharded parameters)."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def whole_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` itself, or its full value when FSDP2 (`fully_shard`) has sharded it into a `DTensor`.

    `DTensor.full_tensor()` is an all-gather that autograd differentiates: its backward hands each rank the
    slice of the gradient that belongs to its shard. The AlignGuard terms depend only on the LoRA weights, so
    their gradient is the same on every rank, and that slice added to FSDP2's reduce-scattered (rank-averaged)
    task gradient counts the regulariser exactly once, as under DDP (verified in tests/test_distributed.py).
    """
    if is_dtensor(weight):
        return weight.full_tensor()
    return weight


def full_parameters(params: list[torch.nn.Parameter]):
    """Context in which `params` hold their full values, also under DeepSpeed ZeRO-3.

    ZeRO-3 leaves partitioned parameters as empty placeholders outside the forward pass; the AlignGuard terms
    are computed after it, so the LoRA weights are gathered read-only (`modifier_rank=None`) for the call. The
    graph keeps the gathered values it needs, and the gradients reach the parameters' ZeRO-3 reduce hooks like
    forward-pass gradients do (verified against a one-process step, docs/distributed.md). Any other engine that
    leaves a weight empty or flattened here (FSDP1's sharded flat parameters) raises instead of failing
    obscurely. FSDP2's `DTensor` parameters keep their 2-D global shape and need nothing here: the regulariser
    gathers them itself (`whole_weight`).

    Raises:
        RuntimeError: if a parameter is sharded by something other than ZeRO-3 or FSDP2.
    """
    zero3 = [p for p in params if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
    # A sharded weight outside forward is an empty or flattened 1-D view of this rank's piece (FSDP1).
    if any(p.dim() < 2 for p in params):
        raise RuntimeError(
            "AlignGuard: some LoRA weights are sharded into flat 1-D pieces (FSDP1 with use_orig_params); the "
            "regulariser needs the full lora_A/lora_B with an autograd path back to the shards, which FSDP1 does "
            "not give. Use FSDP2 (accelerate: `fsdp_version: 2`, configs/accelerate/fsdp.yaml), DDP or DeepSpeed "
            "ZeRO-2/ZeRO-3 (docs/distributed.md)."
        )
    return contextlib.nullcontext()
