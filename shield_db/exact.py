"""The exact acceptance test of a range query: which stored fp16 latents lie within ``radius`` of which queries.

A float32 screen around the queries' mean decides every pair its rounding bound can decide (Higham: the computed
``||q'||^2 + ||z'||^2 - 2 q'.z'`` is within ``2 gamma_{D+2} (||q'||^2 + ||z'||^2)`` of ``||q' - z'||^2``, and
centring moves distances by at most ``u (||q - c|| + ||z - c||)``); the rest are recomputed by float64 differences
and accepted at ``d^2 <= r^2 (1 + ACCEPT_REL)``. Used by the file database (``shield_db.source``) and the
PostgreSQL source (``shield_db.postgres.verify``), as are the float64 distances of their nearest-shield searches.
"""
from __future__ import annotations

import numpy as np
import torch

from .projection import gamma

ACCEPT_REL = 1e-9


def pair_mask(q: np.ndarray, latents: np.ndarray, radius: float) -> torch.Tensor:
    """Bool ``[B, n]``: ``||q_b - z_j|| <= radius`` for float32 queries ``q [B, D]`` and fp16 ``latents [n, ...]``."""
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    raw = latents.reshape(len(latents), -1)
    centre = qt.mean(0)
    qc = qt - centre
    qc_sq = qc.square().sum(1)
    u, g = 2.0 ** -24, gamma(q.shape[1] + 2, 2.0 ** -24)
    q_len = qc_sq.double().sqrt() * (1 + 2 * g)
    zc = torch.from_numpy(raw).float().sub_(centre)  # in place: the fp16 -> f32 copy is the costly pass
    zc_sq = torch.linalg.vector_norm(zc, dim=1).square()
    norms_sq = qc_sq[:, None] + zc_sq[None, :]
    d2 = (norms_sq - 2 * (qc @ zc.T)).double()
    slack = norms_sq.double().mul_(2 * g).mul_(1 + 4 * g).add_(1e-300)
    z_len = zc_sq.double().sqrt_().mul_(1 + 2 * g)
    shift = (q_len[:, None] + z_len[None, :]).mul_(u)
    inside = (d2 + slack).sqrt_().add_(shift) <= radius
    lower = (d2 - slack).clamp_min_(0).sqrt_().sub_(shift)
    unsure = (lower <= radius * (1 + ACCEPT_REL)).logical_and_(~inside).nonzero().tolist()
    if unsure:
        q64 = qt.double()
        for b, j in unsure:
            z64 = torch.from_numpy(raw[j].astype(np.float64))
            inside[b, j] = float((z64 - q64[b]).square().sum()) <= radius * radius * (1 + ACCEPT_REL)
    return inside


def squared_distances(q: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """float64 ``[B, n]`` ``||q_b - z_j||^2`` by explicit differences, for queries ``q [B, D]`` and ``latents [n, ...]``."""
    q64 = torch.from_numpy(np.asarray(q, np.float64))
    z64 = torch.from_numpy(latents.reshape(len(latents), -1).astype(np.float64))
    return torch.stack([(z64 - qb).square().sum(1) for qb in q64]).numpy()


def keep_nearest(best: np.ndarray, best_row: np.ndarray, rows: np.ndarray, d2: np.ndarray) -> None:
    """Fold a chunk's squared distances ``d2 [B, n]`` to ``rows [n]`` into each query's nearest so far (in place)."""
    if d2.shape[1] == 0:
        return
    i = d2.argmin(1)
    d = d2[np.arange(len(d2)), i]
    better = d < best
    best[better], best_row[better] = d[better], rows[i[better]]
