"""The exact denoiser of the empirical data distribution: a real model that memorises its training set.

For training points ``y_1..y_N`` and ``x = y + sigma * eps`` the posterior mean is (e.g. Karras et al.
2022, eq. 57; Kadkhodaie et al. 2024)::

    D(x, sigma) = sum_n w_n(x) y_n,   w = softmax_n( -||x - y_n||^2 / (2 sigma^2) )

A sampler driven by ``D`` can only end on a training point (as sigma -> 0 the softmax becomes an argmin),
which makes it the worst case for protection: it pulls every pushed prediction back to the protected image.

Numerics: the logits drop the per-row constant ``||x||^2`` and use ``(2 x.y_n - ||y_n||^2) / (2 sigma^2)``;
the softmax is evaluated as a streaming log-sum-exp over chunks of the training set, so no ``[B, N, D]``
tensor exists and nothing overflows at small sigma. ``dtype=torch.float64`` (default) keeps the logits
exact enough to resolve neighbours at sigma down to ~1e-3 on [-1, 1] images.
"""
from __future__ import annotations

import torch

CHUNK_ROWS = 8192


class EmpiricalDenoiser:
    """``model(x [B, ...], sigma [B]) -> E[y | x]`` under the empirical distribution of ``data [N, ...]``."""

    def __init__(self, data: torch.Tensor, dtype: torch.dtype = torch.float64, chunk_rows: int = CHUNK_ROWS):
        if data.dim() < 2 or data.shape[0] == 0:
            raise ValueError(f"data must be a non-empty batch [N, ...], got shape {tuple(data.shape)}")
        if not torch.isfinite(data).all():
            raise ValueError("data contains NaN or Inf")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.item_shape = tuple(data.shape[1:])
        self.dtype = dtype
        self.chunk_rows = int(chunk_rows)
        self.flat = data.reshape(data.shape[0], -1).to(dtype)
        self.sq_norms = self.flat.square().sum(1)

    def __len__(self) -> int:
        return self.flat.shape[0]

    def logits(self, x: torch.Tensor, sigma: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``-(||x - y_n||^2 - ||x||^2) / (2 sigma^2)`` for training rows ``start:stop`` -> ``[B, stop-start]``."""
        y = self.flat[start:stop]
        return (2 * x @ y.T - self.sq_norms[start:stop][None, :]) / (2 * sigma.square()[:, None])

    def posterior(self, x: torch.Tensor, sigma: torch.Tensor):
        """Streaming softmax: ``(E[y|x] [B, D], log-normaliser [B], max weight [B])`` in ``self.dtype``."""
        b = x.shape[0]
        x = x.reshape(b, -1).to(self.dtype)
        sigma = torch.broadcast_to(sigma.reshape(-1).to(self.dtype), (b,))
        if x.shape[1] != self.flat.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features per sample, the training data {self.flat.shape[1]}")
        if (sigma <= 0).any():
            raise ValueError(f"sigma must be > 0, got {sigma.min().item()}")
        run_max = torch.full((b,), -torch.inf, dtype=self.dtype)
        run_sum = torch.zeros(b, dtype=self.dtype)
        acc = torch.zeros_like(x)
        top = torch.full((b,), -torch.inf, dtype=self.dtype)
        for start in range(0, len(self), self.chunk_rows):
            stop = min(start + self.chunk_rows, len(self))
            lg = self.logits(x, sigma, start, stop)
            new_max = torch.maximum(run_max, lg.max(1).values)
            rescale = torch.exp(run_max - new_max)
            w = torch.exp(lg - new_max[:, None])
            run_sum = run_sum * rescale + w.sum(1)
            acc = acc * rescale[:, None] + w @ self.flat[start:stop]
            top = torch.maximum(top, lg.max(1).values)
            run_max = new_max
        lse = run_max + run_sum.log()
        return acc / run_sum[:, None], lse, torch.exp(top - lse)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        mean, _, _ = self.posterior(x, sigma)
        return mean.reshape(x.shape).to(x.dtype)
