"""Pairwise distances, the median, the median bandwidth and the RBF kernel: one convention for the whole pack.

Median convention: the **lower median** over the pairs ``i < j`` (``torch.median``). Particle guidance, EDDY,
the correlated-noise weights, the radius calibration node and the benchmark metrics all use it, so a radius
suggested by the calibration node is the scale the metrics report for the same batch.
"""
from __future__ import annotations

import math

import torch

# Elements of one ``[B, chunk, D]`` block of explicit differences held at once (float32: 64 MiB); SPELL's eq. 5
# terms and the exact shield distances are both computed block by block under this one limit.
DIFF_BLOCK_ELEMENTS = 16 * 1024 * 1024


def diff_block_rows(batch: int, dim: int) -> int:
    """Rows of the other set per ``[batch, rows, dim]`` difference block: at least 1, at most the block limit."""
    return max(1, DIFF_BLOCK_ELEMENTS // max(1, batch * dim))


def pairwise_sq_distances(e: torch.Tensor) -> torch.Tensor:
    """``||e_i - e_j||^2 = G_ii + G_jj - 2 G_ij`` for a batch ``e [N, d]``, ``G`` the Gram matrix of the rows
    centred on the batch mean (one matrix product; centring keeps the cancellation at the spread's scale).
    Symmetric, zero diagonal, clamped at 0."""
    c = e - e.mean(0, keepdim=True)
    g = c @ c.t()
    sq = g.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(0)
    d2 = 0.5 * (d2 + d2.t())
    return d2.fill_diagonal_(0)


def pairwise_distances(x) -> torch.Tensor:
    """Exact L2 distances ``[N, N]`` between the rows of ``x [N, ...]`` (explicit differences, float64)."""
    a = torch.as_tensor(x).reshape(len(x), -1).double()
    return torch.stack([(row[None, :] - a).norm(dim=1) for row in a])


def median_pair(d: torch.Tensor):
    """``(lower median, i, j)`` of a symmetric pairwise matrix ``d [N, N]`` over the pairs ``i < j``."""
    n = d.shape[0]
    if n < 2:
        raise ValueError(f"a median over pairs needs a batch of at least 2, got {n}")
    iu = torch.triu_indices(n, n, offset=1, device=d.device)
    value, idx = d[iu[0], iu[1]].median(0)
    return value, int(iu[0, idx]), int(iu[1, idx])


def median_pairwise_distance(x) -> float:
    """Lower median of ``||x_i - x_j||`` over ``i < j``: the SPELL paper's radius scale (radii tried in
    ``[0, 2 x median]``)."""
    value, _, _ = median_pair(pairwise_distances(x))
    return float(value)


def median_bandwidth(e: torch.Tensor, d2: torch.Tensor = None) -> torch.Tensor:
    """Median rule ``h = med_{i<j} ||e_i - e_j||^2 / log(max(N - 1, 2))`` (Corso et al., with a global median)."""
    value, _, _ = median_pair(pairwise_sq_distances(e) if d2 is None else d2)
    return value / math.log(max(e.shape[0] - 1, 2))


def fixed_bandwidth(bandwidth):
    """``None`` for the median rule (``bandwidth`` None or 0), else the checked positive float."""
    if bandwidth is None or float(bandwidth) == 0.0:
        return None
    if not (math.isfinite(float(bandwidth)) and float(bandwidth) > 0):
        raise ValueError(f"bandwidth must be > 0 (or 0/None for the median rule), got {bandwidth!r}")
    return float(bandwidth)


def rbf_kernel(e: torch.Tensor, h) -> torch.Tensor:
    """``k_ij = exp(-||e_i - e_j||^2 / h)`` as an ``[N, N]`` matrix (diagonal 1)."""
    return torch.exp(-pairwise_sq_distances(e) / h)
