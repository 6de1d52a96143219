"""Subspace extraction: energy rule, clipping, randomized vs exact eigh, save/load, random control.

Run: python -m pytest -q tests/test_subspace.py
"""

import pytest
import torch

from alignguard import AlignmentSubspaces, FisherState, SubspaceConfig, build_subspaces, random_subspaces
from alignguard.subspace import choose_m, randomized_eigh, subspace_from_factor


def decaying_psd(d, decay=0.8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    spec = decay ** torch.arange(d, dtype=torch.float64)
    mat = (q * spec) @ q.T
    return mat * (d / torch.trace(mat)), q, spec * (d / spec.sum())


def test_energy_rule_picks_smallest_m():
    eig = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5])
    cfg = SubspaceConfig(energy=0.8, m_min=1, m_max=10)
    assert choose_m(eig, 10.0, cfg, 5) == 2  # 8/10 reached at m=2
    assert choose_m(eig, 10.0, SubspaceConfig(energy=0.81, m_min=1), 5) == 3
    assert choose_m(eig, 10.0, SubspaceConfig(energy=0.8, m_min=4, m_max=10), 5) == 4  # clipped up
    assert choose_m(eig, 10.0, SubspaceConfig(energy=0.99, m_min=1, m_max=2), 5) == 2  # clipped down
    assert choose_m(eig, 10.0, SubspaceConfig(fixed_m=3), 5) == 3
    assert choose_m(eig, 10.0, SubspaceConfig(m_min=8, m_max=16), 5) == 5  # never above d


def test_randomized_matches_exact_on_decaying_spectrum():
    mat, q, spec = decaying_psd(300, decay=0.85)
    w, v = randomized_eigh(mat.float(), 20, oversample=16, power_iters=4)
    torch.testing.assert_close(w.double(), spec[:20], rtol=1e-3, atol=1e-4)
    cos = torch.linalg.svdvals(v.double().T @ q[:, :20])
    assert cos.min() > 0.999
    exact = subspace_from_factor(mat.float(), SubspaceConfig(eigen_solver="exact", energy=0.9, m_min=1))
    rand = subspace_from_factor(mat.float(), SubspaceConfig(eigen_solver="randomized", energy=0.9, m_min=1))
    assert exact.m == rand.m
    assert torch.linalg.svdvals(exact.basis.T @ rand.basis).min() > 0.999
    assert exact.energy >= 0.9 - 1e-6


def test_build_subspaces_from_state_and_save_load(tmp_path):
    mats = {f"layer{i}.q_proj": decaying_psd(40, 0.6 + 0.1 * i, seed=i)[0].float() for i in range(3)}
    state = FisherState(factors=mats, dims={n: (40, 40) for n in mats}, token_counts=dict.fromkeys(mats, 10))
    subs = build_subspaces(state, SubspaceConfig(energy=0.9, m_min=2, m_max=30))
    ms = [subs.subspaces[n].m for n in sorted(mats)]
    assert ms == sorted(ms)  # slower decay -> more directions for the same energy
    for sub in subs.subspaces.values():
        torch.testing.assert_close(sub.basis.T @ sub.basis, torch.eye(sub.m), atol=1e-5, rtol=0)
        assert sub.energy >= 0.9 - 1e-5 or sub.m == 30
    subs.save(tmp_path)
    loaded = AlignmentSubspaces.load(tmp_path)
    assert loaded.summary() == subs.summary()
    for n in mats:
        torch.testing.assert_close(loaded.subspaces[n].basis, subs.subspaces[n].basis)


def test_random_subspaces_keep_m_and_are_orthonormal():
    mats = {"a": decaying_psd(30)[0].float()}
    state = FisherState(factors=mats, dims={"a": (30, 30)}, token_counts={"a": 1})
    subs = build_subspaces(state, SubspaceConfig(fixed_m=6))
    rnd = random_subspaces(subs, seed=3)
    assert rnd.subspaces["a"].m == 6
    torch.testing.assert_close(rnd.subspaces["a"].basis.T @ rnd.subspaces["a"].basis, torch.eye(6), atol=1e-5, rtol=0)
    assert torch.linalg.svdvals(rnd.subspaces["a"].basis.T @ subs.subspaces["a"].basis).max() < 0.99


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"energy": 0}, "energy"),
        ({"m_min": 0}, "m_min"),
        ({"m_min": 8, "m_max": 4}, "m_max"),
        ({"eigen_solver": "x"}, "eigen_solver"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SubspaceConfig(**kwargs)
