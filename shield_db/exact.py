"""The exact acceptance test of a range query and the float64 distances of a nearest search, for fp16 latents read
from a shield database (the file database, ``shield_db.source``, and the PostgreSQL source).

The range test is the one every shield source uses, :func:`guidance.feature_screen.within_mask`: float32 around
the queries' mean with a rigorous rounding bound for the device it runs on, float64 for the pairs the bound cannot
decide, a pair accepted at ``d^2 <= r^2 (1 + ACCEPT_REL)``. It runs where the queries are: on a GPU the candidates
are checked there, not on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch

from .guidance_math import feature_screen as _map


def within_any(q: torch.Tensor, latents: np.ndarray, radius: float) -> np.ndarray:
    """Bool ``[n]``: fp16 ``latents [n, ...]`` within ``radius`` (closed ball) of at least one query ``q [B, D]``
    (float32, on the device where the check runs)."""
    if len(latents) == 0 or len(q) == 0:
        return np.zeros(len(latents), dtype=bool)
    flat = torch.from_numpy(np.ascontiguousarray(latents).reshape(len(latents), -1))
    return _map.within_mask(q, flat, radius).numpy()


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
