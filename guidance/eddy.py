"""EDDY by correlated noise: exact-marginal diversification through the diffusion term of the Fokker-Planck equation.

Why not only a drift. For particles started independently, a drift ``v`` that is divergence-free for the product
density ``P_t = prod_i p_t(x_i)`` (``div(P_t v) = 0``, the construction of ``guidance.eddy_drift``) leaves ``P_t`` a
solution of the perturbed Fokker-Planck equation; by uniqueness the batch stays *jointly* distributed as ``N``
independent samples, so no batch statistic (spread, Vendi, ...) changes in law. Keeping every marginal while
changing the joint law needs the weaker condition that each particle's *marginal* flux is unchanged.

The symmetry used here. In the joint Fokker-Planck equation of ``dX_i = b(X_i, t) dt + g(t) dW_i`` replace the
independent Brownian motions by correlated ones, ``d<W_i, W_j> = C_ij(X, t) I dt`` with ``C_ii = 1``:

    d_t Q = -sum_i div_i(Q b_i) + (g^2 / 2) sum_i Lap_i Q + (g^2 / 2) sum_{i != j} div_i div_j (C_ij Q).

Integrating over every ``x_k``, ``k != i``, kills each cross term (it is a total derivative in ``x_j``), so every
marginal ``q_i`` obeys exactly the unguided one-particle equation: each particle keeps its law, for any state-
dependent ``C``. Written as a drift, the cross term is ``u_i = -(g^2 / 2) sum_{j != i} [C_ij grad_j log Q +
div_j C_ij]``: EDDY's pairwise form ``sum_j [A_ij s_j + div_j A_ij]`` with *symmetric* blocks
``A_ij = -(g^2 / 2) C_ij`` and the *joint* score, which no model provides. Sampling the correlated noise realises
it exactly without any score, and stays exact after discretisation: in a sampler step
``x_i' = F(x_i) + g xi_i``, each ``xi_i`` is ``N(0, I)`` given the past, so every particle's chain is the unguided
chain.

The correlation. ``W`` = RBF kernel of the batch's current predictions (zero diagonal, ``W_ij = k_ij``),
``C = I - s W / rho(W)`` with ``rho`` the spectral radius and ``|s| <= 1``; ``C`` has unit diagonal and
eigenvalues in ``[1 - |s|, 1 + |s|]``, so it is a correlation matrix. Look-alike pairs (large ``k_ij``) get the
most negative correlation; ``s = 1`` with equal weights is the centred noise ``sqrt(N/(N-1)) (z_i - z_bar)``,
the most negative exchangeable Gaussian coupling. Noise ``xi = (C^{1/2} (x) I) z`` with ``z`` iid ``N(0, I)``.

The design alternative. ``guidance.coupling.couple_noise(z, grid)`` (the start coupling's rigid simplex design on
a coarse grid) is exact for one draw too and leaves no look-alike pair in the coupled coordinates, which made it
the stronger choice on a real model (BENCHMARKS.md). ``blend`` gives it a strength: ``sqrt(1 - s) w + sqrt(s) c``
with ``w`` an independent iid draw and ``c`` the coupled one is again exactly ``N(0, I)`` per sample, with ``s``
times the design's cross-sample covariance (linear in ``s``, like ``C`` above).
"""
from __future__ import annotations

import torch

from .coupling import couple_noise
from .kernels import median_bandwidth, pairwise_sq_distances


def kernel_weights(e: torch.Tensor, bandwidth=None) -> torch.Tensor:
    """``W_ij = exp(-||e_i - e_j||^2 / h)`` for ``i != j``, 0 on the diagonal (``h``: median rule when None); float64
    on the CPU, where the whole ``[N, N]`` construction runs (MPS has no float64)."""
    d2 = pairwise_sq_distances(e.detach().flatten(1).to("cpu", torch.float64))
    h = median_bandwidth(e, d2) if bandwidth is None else torch.as_tensor(float(bandwidth), dtype=d2.dtype)
    weights = torch.exp(-d2 / h.clamp_min(torch.finfo(d2.dtype).tiny))
    return weights.fill_diagonal_(0)


def uniform_weights(n: int) -> torch.Tensor:
    """Equal weights ``W = 11^T - I`` (no state yet, e.g. the starting noise)."""
    return torch.ones(n, n, dtype=torch.float64).fill_diagonal_(0)


def noise_correlation(weights: torch.Tensor, strength: float) -> torch.Tensor:
    """``C = I - s W / rho(W)``: a correlation matrix for ``|s| <= 1`` (see the module docstring)."""
    if not -1.0 <= strength <= 1.0:
        raise ValueError(f"correlation strength must lie in [-1, 1] (1 = most anti-correlated), got {strength}")
    n = weights.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    rho = torch.linalg.eigvalsh(weights.double()).abs().max() if n > 1 else torch.zeros((), dtype=torch.float64)
    if rho <= 0 or strength == 0:
        return eye
    return eye - strength * weights.double() / rho


def correlation_root(corr: torch.Tensor) -> torch.Tensor:
    """Symmetric square root ``R`` of the correlation matrix, rows rescaled to unit norm so that
    ``(R R^T)_ii = 1`` holds to rounding (each particle's noise stays exactly ``N(0, I)``)."""
    values, vectors = torch.linalg.eigh(corr.double())
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.t()
    return root / root.norm(dim=1, keepdim=True)


def correlate(z: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``xi_i = sum_j R_ij z_j`` over the batch (first) dimension of ``z`` (any trailing shape)."""
    if z.shape[0] != root.shape[0]:
        raise ValueError(f"noise batch {z.shape[0]} does not match the correlation matrix {tuple(root.shape)}")
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    flat = z.reshape(z.shape[0], -1).to(work)
    return (root.to(device=z.device, dtype=work) @ flat).to(z.dtype).reshape(z.shape)


def blend(independent: torch.Tensor, coupled: torch.Tensor, strength: float) -> torch.Tensor:
    """``sqrt(1 - s) w + sqrt(s) c``: exactly ``N(0, I)`` per sample when ``w`` is an independent iid draw and
    every ``c_i`` is ``N(0, I)``; cross-sample covariance ``s Cov(c_i, c_j)``."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"blend strength must lie in [0, 1], got {strength}")
    if strength == 1.0:
        return coupled
    return (1 - strength) ** 0.5 * independent + strength ** 0.5 * coupled


def eddy_noise(z: torch.Tensor, strength: float, embedded: torch.Tensor = None, bandwidth=None) -> torch.Tensor:
    """EDDY's noise for one sampler draw: ``z`` correlated across the batch by ``C`` built from the kernel of
    ``embedded`` (the batch's current predictions in the guidance space), or with equal weights if None."""
    n = z.shape[0]
    if n < 2 or strength == 0:
        return z
    weights = uniform_weights(n) if embedded is None else kernel_weights(embedded, bandwidth)
    return correlate(z, correlation_root(noise_correlation(weights, strength)))


def exact_marginal_noise(z: torch.Tensor, strength: float, grid: int = 0, independent=None, embedded=None,
                         bandwidth=None) -> torch.Tensor:
    """EDDY's one rule for a noise draw, at the start and at every fresh draw; each item stays exactly ``N(0, I)``.

    ``grid > 0``: the start coupling's design on that grid, blended by ``strength`` with ``independent()`` (an
    independent iid draw, requested only when ``strength < 1``). ``grid == 0``: ``z`` correlated by the kernel
    of ``embedded`` (equal weights when None), ``C = I - s W / rho(W)``."""
    if grid:
        coupled = couple_noise(z, grid)
        return coupled if strength == 1 else blend(independent(), coupled, strength)
    return eddy_noise(z, strength, embedded, bandwidth)
