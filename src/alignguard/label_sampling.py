"""Sampled Fisher labels: one draw per row of a probability matrix, as `torch.multinomial(p, 1)` draws it.

On the CPU, `multinomial` spends most of a small model's Fisher pass drawing an exponential number per vocabulary
entry in one serial loop; the same race with the log and the division vectorised gives the same labels faster.
"""

from __future__ import annotations

import torch


def _exponential_race(probs: torch.Tensor, generator: torch.Generator, chunk_elems: int = 1 << 18) -> torch.Tensor:
    """One draw per row of `probs`, as torch.multinomial(probs, 1) draws it on the CPU: argmax(p / E) with
    E ~ Exp(1) from `generator` (the exponential race), E = -log(1 - U) from the float64 uniforms that
    `exponential_` takes, in the same order. multinomial's `exponential_` is one serial scalar loop (log and
    all) over n x V entries; here only the uniforms are serial, the log and the division are vectorised, chunk
    by chunk in cache."""
    n, v = probs.shape
    out = torch.empty(n, dtype=torch.long)
    rows = max(1, chunk_elems // v)
    noise = torch.empty(min(rows, n), v, dtype=torch.float64)
    ratio = torch.empty(min(rows, n), v, dtype=probs.dtype)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        u = noise[: stop - start].uniform_(0.0, 1.0, generator=generator)
        u.neg_().log1p_().neg_()
        q = ratio[: stop - start]
        q.copy_(u)
        torch.div(probs[start:stop], q, out=q)
        torch.argmax(q, dim=-1, out=out[start:stop])
    return out


_RACE_MATCHES_MULTINOMIAL: bool | None = None


def _race_matches_multinomial() -> bool:
    """Whether this torch draws multinomial(p, 1) on the CPU exactly as `_exponential_race` (checked once, so a
    torch that changes its sampler falls back to multinomial instead of silently changing the labels)."""
    global _RACE_MATCHES_MULTINOMIAL
    if _RACE_MATCHES_MULTINOMIAL is None:
        probs = torch.softmax(torch.randn(64, 96, generator=torch.Generator().manual_seed(1)), -1)
        a = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(2)).squeeze(-1)
        b = _exponential_race(probs, torch.Generator().manual_seed(2), chunk_elems=96 * 5)
        _RACE_MATCHES_MULTINOMIAL = torch.equal(a, b)
    return _RACE_MATCHES_MULTINOMIAL


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torch.multinomial(probs, 1, generator=generator).squeeze(-1): the same labels, faster on the CPU."""
    if probs.device.type == "cpu" and probs.dtype in (torch.float32, torch.float64) and _race_matches_multinomial():
        return _exponential_race(probs, generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
