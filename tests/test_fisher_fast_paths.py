"""The Fisher pass's fast paths give the numbers of the plain ones: the CPU label sampler draws what
torch.multinomial draws (and leaves the generator where it would), the blocked Gram sum equals g^T g."""

import pytest
import torch

from alignguard.accumulator import _BLOCKED_MIN_DIM, FactorAccumulator
from alignguard.config import FisherConfig
from alignguard.label_sampling import _exponential_race, sample_categorical


@pytest.mark.parametrize("n,v,chunk", [(7, 5, 10), (64, 96, 96 * 5), (33, 1000, 1 << 18)])
def test_sampler_draws_what_multinomial_draws(n, v, chunk):
    probs = torch.softmax(3 * torch.randn(n, v, generator=torch.Generator().manual_seed(n)), -1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(v)).squeeze(-1)
    assert torch.equal(_exponential_race(probs, torch.Generator().manual_seed(v), chunk_elems=chunk), expected)
    assert torch.equal(sample_categorical(probs, torch.Generator().manual_seed(v)), expected)


def test_sampler_leaves_the_generator_where_multinomial_does():
    probs = torch.softmax(torch.randn(9, 50, generator=torch.Generator().manual_seed(0)), -1)
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.multinomial(probs, 1, generator=a)
    sample_categorical(probs, b)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))  # later batches' labels agree too


def test_blocked_gram_sum_equals_the_full_product():
    d = _BLOCKED_MIN_DIM + 3  # odd halves
    acc = FactorAccumulator({"m": (d, 4)}, FisherConfig(show_progress=False), "cpu")
    g = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(0))
    acc.positions = torch.ones(2, 5, dtype=torch.bool)
    acc.add("m", g)
    acc.add("m", 2 * g)
    flat = g.reshape(-1, d)
    torch.testing.assert_close(acc.dense_sum("m"), 5 * flat.T @ flat)
    torch.testing.assert_close(acc.normalised("m", d), acc.dense_sum("m") * (d / acc.dense_sum("m").trace()))
