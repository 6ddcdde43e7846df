"""Start coupling: spread a batch by coupling its starting noises, keeping every sample's distribution exactly.

Why a marginal-preserving drift cannot spread a batch. Let ``p = prod_i p_t(x_i)`` be the joint density of
``N`` independent samples at noise level ``t``. A drift ``v`` with ``div(p v) = 0`` (EDDY,
``guidance/eddy_drift.py``; more generally any drift that is divergence-free w.r.t. each particle's ``p_t`` for
every fixed configuration of the others) adds ``-div(p v) = 0`` to the joint Fokker-Planck / continuity
equation, so ``p`` remains its solution and, by uniqueness, the batch remains distributed as ``N``
INDEPENDENT samples at every time: no statistic of the batch (mean pairwise distance, Vendi, ...) changes in
law. Such a drift only changes which sample each starting noise is carried to.

How much any exact method can spread. For ANY joint law whose marginals are all ``p`` (mean ``mu``,
covariance trace ``T``), the mean over ordered pairs ``i != j`` of ``E||X_i - X_j||^2`` is

    (2 N sum_i E||X_i - mu||^2 - 2 E||sum_i (X_i - mu)||^2) / (N (N - 1))  <=  2 T N / (N - 1),

against ``2 T`` for independent samples: the mean SQUARED pairwise distance can grow by at most
``1 / (N - 1)`` (+100% at N = 2, +33% at N = 4, +14.3% at N = 8), with equality iff the batch sum is
constant. Spreading with exact marginals therefore pays off most for small batches.

The construction (an exact-marginal coupling of the starting noise). Every sampler (ODE or SDE) maps a
starting noise ``z ~ N(0, I)`` to a sample; if each ``z_i`` is exactly ``N(0, I)`` then each output is exactly
distributed as an unguided sample, whatever the dependence between the ``z_i``. Take an orthonormal
low-dimensional subspace ``P`` (``m x D``, ``P P^T = I``): orthonormal block pooling, the sum over a block of
a ``g x g`` grid (per channel; over all frames of a video) divided by ``sqrt(block size)``, giving
``m = C g^2`` coordinates ``c_i = P z_i`` that are iid ``N(0, 1)``; ``g = 1`` = per-channel means. Write
``c_i = r_i u_i`` (``r_i = ||c_i|| ~ chi_m``, ``u_i`` uniform on the sphere; ``r``, ``u`` and the residual
``w_i = (I - P^T P) z_i`` are mutually independent for Gaussian ``z``). Replace

    z_i' = w_i + P^T (r_i Q d_i),

with ``d_1..d_N`` a fixed well-spread design of unit vectors in ``R^m`` (regular simplex when ``N <= m + 1``,
``d_i . d_j = -1/(N-1)``; the regular polygon when ``m = 2``; alternating signs when ``m = 1``; otherwise a
deterministic Thomson (Riesz-1 energy) optimisation on the sphere, cached) and ``Q`` a Haar-random orthogonal
matrix. ``Q d_i`` is uniform on the sphere and independent of ``(r_i, w_i)``, so ``z_i'`` has the law of
``z_i``: exactly ``N(0, I)``. Jointly, the projected parts have inner products ``r_i r_j d_i . d_j`` (negative
for the simplex): the batch is negatively dependent in the subspace and independent elsewhere. ``Q`` is drawn
from a generator seeded by a hash of the discarded directions ``u_i`` (a function of ``u`` only, hence
independent of ``r`` and ``w``; reproducible for a given noise, i.e. for a given sampler seed), exactly as
the sampler's own noise is pseudo-random from a seed.
"""
from __future__ import annotations

import functools
import hashlib
import math

import torch

THOMSON_STEPS = 3000
THOMSON_SEED = 0


def _check_grid(z: torch.Tensor, grid: int):
    if z.dim() not in (4, 5):
        raise ValueError(f"start coupling needs latents [N, C, H, W] or [N, C, T, H, W], got shape {tuple(z.shape)}")
    if int(grid) != grid or grid < 1:
        raise ValueError(f"grid must be a whole number >= 1, got {grid!r}")
    if grid > z.shape[-2] or grid > z.shape[-1]:
        raise ValueError(f"grid {grid}x{grid} is larger than the latent's {z.shape[-2]}x{z.shape[-1]} pixels")


def block_matrix(size: int, grid: int, dtype=torch.float64) -> torch.Tensor:
    """``[grid, size]`` 0/1 matrix of the blocks ``{y : floor(y grid / size) = a}`` (sizes differ by <= 1)."""
    block = torch.div(torch.arange(size) * grid, size, rounding_mode="floor")
    return (block[None, :] == torch.arange(grid)[:, None]).to(dtype)


def _block_sums(z: torch.Tensor, grid: int) -> torch.Tensor:
    """Block sums ``[N, C, g, g]`` of ``z`` (a video's frames are summed whole)."""
    if z.dim() == 5:
        z = z.sum(2)
    mh, mw = block_matrix(z.shape[-2], grid, z.dtype), block_matrix(z.shape[-1], grid, z.dtype)
    return mh @ z @ mw.t()                              # two matmuls: einsum picked a slow order for small g


def _block_sizes(shape, grid: int) -> torch.Tensor:
    """Number of latent elements in each block, ``[g, g]`` (frames included)."""
    frames = shape[2] if len(shape) == 5 else 1
    mh, mw = block_matrix(shape[-2], grid), block_matrix(shape[-1], grid)
    return frames * mh.sum(1)[:, None] * mw.sum(1)[None, :]


def project(z: torch.Tensor, grid: int) -> torch.Tensor:
    """``c = P z``: orthonormal block pooling (block sum / sqrt(block size)), ``[N, C g^2]`` (float64)."""
    _check_grid(z, grid)
    grid = int(grid)
    z = z.detach().to("cpu", torch.float64)
    return (_block_sums(z, grid) / _block_sizes(z.shape, grid).sqrt()).reshape(z.shape[0], -1)


def lift(c: torch.Tensor, shape, grid: int) -> torch.Tensor:
    """``P^T c`` for coordinates ``c [N, C g^2]`` as a float64 tensor of ``shape`` (block-constant)."""
    n, ch = shape[0], shape[1]
    per_block = c.reshape(n, ch, grid, grid) / _block_sizes(shape, grid).sqrt()
    mh, mw = block_matrix(shape[-2], grid), block_matrix(shape[-1], grid)
    out = mh.t() @ per_block @ mw
    return out[:, :, None].expand(*shape) if len(shape) == 5 else out


def simplex_design(n: int, m: int) -> torch.Tensor:
    """Regular simplex: ``n <= m + 1`` unit vectors in ``R^m`` with ``d_i . d_j = -1/(n-1)``."""
    if n > m + 1:
        raise ValueError(f"a regular simplex of {n} vertices needs dimension >= {n - 1}, got {m}")
    if n == 1:
        return torch.eye(1, m, dtype=torch.float64)
    centred = torch.eye(n, dtype=torch.float64) - 1.0 / n          # vertices e_i - 1/n, in the sum-zero plane
    basis = torch.linalg.qr(centred[:, : n - 1])[0]                  # orthonormal basis of that plane, [n, n-1]
    coords = centred @ basis
    coords = coords / coords.norm(dim=1, keepdim=True)
    return torch.cat([coords, torch.zeros(n, m - (n - 1), dtype=torch.float64)], 1)


def polygon_design(n: int) -> torch.Tensor:
    """Regular ``n``-gon on the unit circle (``m = 2``)."""
    angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    return torch.stack([angle.cos(), angle.sin()], 1)


@functools.lru_cache(maxsize=64)
def _thomson(n: int, m: int) -> torch.Tensor:
    """``n`` unit vectors in ``R^m`` minimising the Riesz-1 energy ``sum_{i<j} 1/||d_i - d_j||`` (seeded, cached)."""
    gen = torch.Generator().manual_seed(THOMSON_SEED)
    d = torch.randn(n, m, generator=gen, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True)
    step = 0.1
    for it in range(THOMSON_STEPS):
        diff = d[:, None, :] - d[None, :, :]
        dist = diff.norm(dim=-1) + torch.eye(n, dtype=torch.float64)
        force = (diff / dist[..., None] ** 3).sum(1)                    # -grad of the energy
        force = force - (force * d).sum(1, keepdim=True) * d            # tangent to the sphere
        d = d + step * force / force.norm(dim=1, keepdim=True).max().clamp_min(1e-300) * (1 - it / THOMSON_STEPS)
        d = d / d.norm(dim=1, keepdim=True)
    return d


def design(n: int, m: int) -> tuple[torch.Tensor, str]:
    """``(d [n, m] unit vectors, name)``: the well-spread design the coupling rotates."""
    if int(n) != n or n < 1 or int(m) != m or m < 1:
        raise ValueError(f"design needs whole numbers n >= 1 and m >= 1, got n={n!r}, m={m!r}")
    if n <= m + 1:
        return simplex_design(n, m), "regular simplex"
    if m == 1:
        return torch.tensor([[1.0], [-1.0]], dtype=torch.float64).repeat(n // 2 + 1, 1)[:n], "alternating signs"
    if m == 2:
        return polygon_design(n), "regular polygon"
    return _thomson(n, m).clone(), "Thomson (Riesz-1) points"


def rotation_seed(u: torch.Tensor) -> int:
    """63-bit seed hashed from the directions ``u`` (float64 bytes): the same noise gives the same rotation."""
    digest = hashlib.blake2b(u.detach().to("cpu", torch.float64).contiguous().numpy().tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2 ** 63 - 1)


def haar_rotation(m: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal ``[m, m]`` matrix: QR of a Gaussian matrix with the signs of diag(R) fixed."""
    q, r = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def coupled_coordinates(c: torch.Tensor) -> torch.Tensor:
    """``c_i' = r_i Q d_i`` for projected noises ``c [N, m]`` (``r_i = ||c_i||``, ``Q`` seeded by ``u = c / r``)."""
    n, m = c.shape
    r = c.norm(dim=1, keepdim=True)
    u = torch.where(r > 0, c / r.clamp_min(1e-300), torch.zeros_like(c))
    q = haar_rotation(m, torch.Generator().manual_seed(rotation_seed(u)))
    d, _ = design(n, m)
    return r * (d @ q.t())


def couple_noise(z: torch.Tensor, grid) -> torch.Tensor:
    """Start coupling of standard-normal noises ``z [N, C, H, W]`` / ``[N, C, T, H, W]`` on a ``grid x grid`` grid.

    Each returned ``z_i'`` is exactly ``N(0, I)``; the batch is spread in the ``m = C grid^2`` pooled
    coordinates (module docstring). ``grid`` None/0 or a batch of 1 returns ``z`` itself. Same dtype/device.
    """
    if grid is None or grid == 0:
        return z
    _check_grid(z, grid)
    grid = int(grid)
    if z.shape[0] < 2:
        return z
    if not torch.isfinite(z).all():
        raise ValueError("start coupling got noise with NaN/inf values")
    c = project(z, grid)
    delta = lift(coupled_coordinates(c) - c, z.shape, grid)
    return (z.detach().to("cpu", torch.float64) + delta).to(z.dtype).to(z.device)
