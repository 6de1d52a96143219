"""Streaming low-rank sketch of a PSD matrix G = sum_t g_t g_t^T with O(d * k) memory.

Reference: Tropp, Yurtsever, Udell, Cevher, "Fixed-rank approximation of a positive-semidefinite matrix from
streaming data" (NeurIPS 2017): keep Y = G @ Omega for a fixed Gaussian test matrix Omega (d x k); because Y
is linear in G it can be updated from each batch of gradients (Y += g^T (g @ Omega)) and summed across
processes, and at the end the stabilised Nystrom approximation G ~ Y (Omega^T Y)^+ Y^T gives the top
eigenpairs. The exact trace is accumulated alongside so the energy rule stays exact.
"""

from __future__ import annotations

import torch


class NystromSketch:
    """Rank-k streaming sketch of a d x d PSD matrix.

    Args:
        dim: d.
        rank: k (number of test vectors).
        seed: seed of Omega; all processes of a distributed run must use the same seed so sketches can be summed.
        device: where Y and Omega live.
    """

    def __init__(self, dim: int, rank: int, seed: int = 0, device: torch.device | str = "cpu"):
        self.dim = dim
        self.rank = min(rank, dim)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        omega = torch.randn(dim, self.rank, generator=gen, dtype=torch.float32)
        self.omega = torch.linalg.qr(omega).Q.to(device)
        self.y = torch.zeros(dim, self.rank, dtype=torch.float32, device=device)
        self.trace = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, g: torch.Tensor) -> None:
        """Add sum_t g_t g_t^T for the rows g_t of g (n x d)."""
        g = g.float()
        self.y.addmm_(g.T, g @ self.omega)
        self.trace += (g.double() ** 2).sum()

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Top eigenpairs (descending eigenvalues, eigenvectors as columns) of the sketched matrix."""
        y = self.y.double()
        omega = self.omega.double()
        # Shift by a tiny multiple of ||Y|| so the Cholesky factor exists (Tropp et al., Alg. 3).
        nu = torch.finfo(torch.float32).eps * max(torch.linalg.matrix_norm(y, ord=2).item(), 1e-30)
        y_nu = y + nu * omega
        core = omega.T @ y_nu
        core = (core + core.T) / 2
        try:
            chol = torch.linalg.cholesky(core)
            b = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T  # B B^T = Y core^-1 Y^T
        except torch.linalg.LinAlgError:
            # Not positive definite in floating point: use core^-1/2 from its eigen-decomposition instead.
            w, v = torch.linalg.eigh(core)
            b = y_nu @ v @ torch.diag(w.clamp_min(nu).rsqrt())
        u, s, _ = torch.linalg.svd(b, full_matrices=False)
        eig = (s**2 - nu).clamp_min(0.0)
        return eig.float(), u.float()
