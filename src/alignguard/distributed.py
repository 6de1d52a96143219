"""Helpers for multi-process runs (DESIGN.md §3 "Distributed"; see docs/distributed.md).

The Fisher pass needs each token on exactly one rank: `estimate_fisher` all-reduces the sums of g g^T (or the
sketches Y = G Omega), the traces and the token counts before normalising, so the result equals the one-process
result over the union of the shards. `shard_batches` gives such a split for a list of pre-made batches (e.g.
from `alignguard.data.make_batches`); a `torch.utils.data.DataLoader` passed through `accelerator.prepare`
is sharded the same way by accelerate.

    from alignguard.distributed import shard_batches
    state = estimate_fisher(model, shard_batches(batches), FisherConfig(fisher_labels="empirical"))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
