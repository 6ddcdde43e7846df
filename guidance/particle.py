"""Particle guidance: RBF-kernel repulsion across the batch (Corso et al., ICLR 2024, "Particle Guidance:
non-I.I.D. Diverse Sampling with Diffusion Models").

Notation. A batch of ``N`` particles embedded as ``e_i = e(x_i) in R^{d_e}`` (``guidance.embeddings``);
kernel ``k_ij = exp(-||e_i - e_j||^2 / h)``; kernel energy ``E = 1/2 sum_{i != j} k_ij``.

- Median bandwidth: ``h = med_{i<j} ||e_i - e_j||^2 / log(N - 1)`` (so that ``sum_{j != i} k_ij ~ 1``).
  ``torch.median`` gives the lower median for an even number of pairs. ``N = 2`` would divide by
  ``log 1 = 0``; we use ``log(max(N - 1, 2))``. Corso et al.'s public code takes a per-particle median
  (over each row); we take one median over all pairs so the kernel stays symmetric, the repulsion is the
  exact gradient of one energy, and EDDY's antisymmetry ``A_ij = -A_ji^T`` holds.
- Repulsion: ``phi_i = -grad_{e_i} E = sum_j (2 / h) k_ij (e_i - e_j)`` (``h`` held fixed, as in SVGD).
- Through an embedding: ``g_i = J_e(x_i)^T phi_i`` by autograd (vector-Jacobian product).

Where the correction goes (k-diffusion convention ``x = x0 + sigma eps``, denoiser ``D``): particle
guidance adds ``gamma grad log Phi`` to the score, i.e. ``D' = D + sigma^2 gamma g``. We use

    Delta = strength * sigma * eta * g,    eta = (sqrt(h) / 2) * sum_i ||phi_i||^2 / sum_i ||g_i||^2,

so ``gamma = strength * eta / sigma``. In the latent space (``g = phi``) this is
``Delta_i = strength * sigma * sum_j k_ij (x_i - x_j) / sqrt(h)``: a dimensionless kernel-weighted
direction (order 1, whatever the spread) times the noise level. For a linear embedding with ``P P^T = c I``
(average pooling) the embedded prediction moves by exactly ``strength * sigma * (sqrt(h)/2) phi_i``; in general
``eta`` is the least-squares scalar for which ``J Delta`` matches that move. Scaling the data and sigma by
``c`` scales ``Delta`` by ``c``. An Euler step moves the sample by ``Delta (sigma - sigma_next) / sigma``, i.e. by
``strength * O(1) * (sigma - sigma_next)``: the push is largest at high noise and does not compound with the
spread it creates (a push proportional to the current separation grows the spread exponentially). This is
the scaling of Corso et al.'s latent code, where ``phi`` is computed on the noisy latents (distances ~ sigma).
The sigma window (Corso et al.: only ``sigma > 1``) is applied by the caller (``nodes/particle_patch.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .embeddings import LatentEmbedding
from .kernels import fixed_bandwidth, median_bandwidth, pairwise_sq_distances, rbf_kernel


def kernel_energy(e: torch.Tensor, h) -> torch.Tensor:
    """``E = 1/2 sum_{i != j} k_ij``: the potential particle guidance descends."""
    k = rbf_kernel(e, h)
    return 0.5 * (k.sum() - k.diagonal().sum())


def repulsion(e: torch.Tensor, h, d2: torch.Tensor = None) -> torch.Tensor:
    """``phi_i = -grad_{e_i} E = sum_j (2/h) k_ij (e_i - e_j)`` for ``e [N, d]`` (``h`` fixed), as ``[N, d]``:
    one product with the kernel's graph Laplacian ``(2/h) (diag(k 1) - k)``."""
    k = rbf_kernel(e, h) if d2 is None else torch.exp(-d2 / h)
    laplacian = torch.diag(k.sum(1)) - k
    return (laplacian * (2.0 / h)) @ e


@dataclass
class ParticleResult:
    """Correction of the predictions: ``delta`` (same shape as ``x0``, float32) and the bandwidth used."""

    delta: torch.Tensor
    bandwidth: float


def _as_bandwidth(e: torch.Tensor, bandwidth, d2=None) -> torch.Tensor:
    fixed = fixed_bandwidth(bandwidth)
    if fixed is None:
        return median_bandwidth(e, d2)
    return torch.tensor(fixed, dtype=e.dtype, device=e.device)


def embedded_repulsion(x: torch.Tensor, embedding, bandwidth=None):
    """``(g [N, ...] = J_e^T phi, phi [N, d_e], h)`` for particles ``x [N, ...]`` in the embedding's space."""
    with torch.inference_mode(False), torch.enable_grad():
        if isinstance(embedding, LatentEmbedding):      # J = I: no autograd, no copy
            e = embedding(x.detach().float())
            d2 = pairwise_sq_distances(e)
            h = _as_bandwidth(e, bandwidth, d2)
            phi = repulsion(e, h, d2)
            return phi.reshape(x.shape), phi, h
        xg = x.detach().float().clone().requires_grad_(True)
        e = embedding(xg)
        d2 = pairwise_sq_distances(e.detach())
        h = _as_bandwidth(e.detach(), bandwidth, d2)
        phi = repulsion(e.detach(), h, d2)
        (g,) = torch.autograd.grad(e, xg, grad_outputs=phi)
        return g.detach(), phi, h


def particle_guidance(x0: torch.Tensor, strength: float, embedding=None, bandwidth=None,
                      sigma: float = 1.0) -> ParticleResult:
    """Particle-guidance correction ``Delta = strength * sigma * eta * J^T phi`` of predictions ``x0 [N, ...]``.

    ``embedding``: a callable from ``guidance.embeddings`` (default: the latent itself); ``bandwidth``:
    ``h`` in embedding units, ``None``/0 for the median rule. ``N < 2`` gives a zero correction.
    """
    if x0.dim() < 2:
        raise ValueError(f"x0 must be a batch [N, ...], got shape {tuple(x0.shape)}")
    if not math.isfinite(float(strength)):
        raise ValueError(f"strength must be a finite number, got {strength!r}")
    if not (math.isfinite(float(sigma)) and float(sigma) >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if x0.shape[0] < 2 or float(strength) == 0.0:
        return ParticleResult(torch.zeros_like(x0, dtype=torch.float32), float("nan"))
    embedding = embedding or LatentEmbedding()
    g, phi, h = embedded_repulsion(x0, embedding, bandwidth)
    if not h > 0:                                       # all particles coincide: nothing to repel
        return ParticleResult(torch.zeros_like(g), float(h))
    if isinstance(embedding, LatentEmbedding):          # g = phi: eta = sqrt(h)/2 exactly
        return ParticleResult(g.mul_(float(strength) * float(sigma) * 0.5 * float(h.sqrt())), float(h))
    g_sq = g.square().sum()
    if not (g_sq > 0):
        return ParticleResult(torch.zeros_like(g), float(h))
    eta = 0.5 * h.sqrt() * phi.square().sum() / g_sq
    return ParticleResult(float(strength) * float(sigma) * eta * g, float(h))
