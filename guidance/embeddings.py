"""Low-dimensional, differentiable embeddings of a batch in which particle guidance measures similarity.

An RBF kernel on a whole 64x64x4 latent repels very little (every pair is about equally far apart in high
dimension); the repulsion thesis (Imperial College, "Repulsion in Stable Diffusion 2") compares particles
in small embeddings of the predicted image instead, with the gradient flowing back through the embedding.

Every embedding maps ``x [B, C, H, W]`` (or any ``[B, ...]`` for ``latent``) to ``e [B, d_e]`` and is
differentiable (plain torch ops). Video latents ``[B, C, T, H, W]`` (WAN, Hunyuan, LTXV) are one item per
video: every frame is embedded on its own and the frames' embeddings are concatenated (``d_e`` grows by ``T``),
so two videos are alike when they are alike frame by frame. Linear ones (``latent``, ``pooled``, ``colour``) also give
``gram_diag(x) = diag(P P^T)`` of their matrix ``P``, which EDDY needs for an exact divergence.

- ``latent``:  the flattened tensor itself (``P = I``).
- ``pooled``:  adaptive average pooling to an ``n x n`` grid per channel.
- ``colour``:  per-channel means on a 2 x 2 layout (colour layout; its average is the per-channel mean).
- ``edges``:   Sobel gradient magnitude of the channel-mean image, average-pooled to ``n x n`` (nonlinear).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SPACES = ("latent", "pooled", "colour", "edges")
COLOUR_GRID = 2
EDGE_EPS = 1e-6


def _check_image(x: torch.Tensor, space: str):
    if x.dim() not in (4, 5):
        raise ValueError(f"the '{space}' embedding needs images [B, C, H, W] or videos [B, C, T, H, W], got shape "
                         f"{tuple(x.shape)}")


def frames_as_channels(x: torch.Tensor, space: str) -> torch.Tensor:
    """``[B, C, H, W]`` as it is; a video ``[B, C, T, H, W]`` as ``[B, C T, H, W]`` (each frame its own channels)."""
    _check_image(x, space)
    return x if x.dim() == 4 else x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])


def _region_sizes(size: int, n: int) -> torch.Tensor:
    """Lengths of the ``n`` windows of ``adaptive_avg_pool`` over ``size`` (start floor(i s/n), end ceil((i+1) s/n))."""
    i = torch.arange(n)
    start = torch.div(i * size, n, rounding_mode="floor")
    end = torch.div((i + 1) * size + n - 1, n, rounding_mode="floor")
    return (end - start).double()


class LatentEmbedding:
    """``e = flatten(x)``: the kernel works on the latents themselves."""

    linear = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    def gram_diag(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(math.prod(x.shape[1:]), dtype=x.dtype, device=x.device)


class PooledEmbedding:
    """``e = adaptive_avg_pool2d(x, n)``: coarse layout of every channel on an ``n x n`` grid."""

    linear = True

    def __init__(self, n: int, name: str = "pooled"):
        if int(n) != n or n < 1:
            raise ValueError(f"pool size must be a whole number >= 1, got {n!r}")
        self.n, self.name = int(n), name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(frames_as_channels(x, self.name), self.n).reshape(x.shape[0], -1)

    def gram_diag(self, x: torch.Tensor) -> torch.Tensor:
        """``(P P^T)_cc = 1 / |window c|`` for average pooling (windows may overlap; the diagonal is still this)."""
        planes = frames_as_channels(x, self.name).shape[1]
        area = _region_sizes(x.shape[-2], self.n)[:, None] * _region_sizes(x.shape[-1], self.n)[None, :]
        return (1.0 / area).reshape(-1).repeat(planes).to(x.dtype).to(x.device)


class EdgeEmbedding:
    """``e = avgpool_n(sqrt(sobel_x(g)^2 + sobel_y(g)^2 + eps))`` with ``g`` the channel mean: where the edges are."""

    linear = False

    def __init__(self, n: int):
        if int(n) != n or n < 1:
            raise ValueError(f"pool size must be a whole number >= 1, got {n!r}")
        self.n = int(n)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "edges")
        g = x.mean(1).reshape(-1, 1, x.shape[-2], x.shape[-1])      # channel mean of every frame, [B T, 1, H, W]
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device) / 8
        kernels = torch.stack([kx, kx.t()])[:, None]
        grad = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), kernels)
        magnitude = (grad.square().sum(1, keepdim=True) + EDGE_EPS).sqrt()
        return F.adaptive_avg_pool2d(magnitude, self.n).reshape(x.shape[0], -1)


def make_embedding(space: str, pool_size: int = 8):
    """The embedding named ``space`` (one of :data:`SPACES`); ``pool_size`` is the grid of ``pooled``/``edges``."""
    if space == "latent":
        return LatentEmbedding()
    if space == "pooled":
        return PooledEmbedding(pool_size)
    if space == "colour":
        return PooledEmbedding(COLOUR_GRID, name="colour")
    if space == "edges":
        return EdgeEmbedding(pool_size)
    raise ValueError(f"space must be one of {SPACES}, got {space!r}")
