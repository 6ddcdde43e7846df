"""The exact acceptance test of :mod:`shield_db.source`, for latents fetched from PostgreSQL instead of shards.

A float32 screen around the queries' mean decides every pair its rounding bound can decide (Higham: the computed
``||q'||^2 + ||z'||^2 - 2 q'.z'`` is within ``2 gamma_{D+2} (||q'||^2 + ||z'||^2)`` of ``||q' - z'||^2``, and
centring moves distances by at most ``u (||q - c|| + ||z - c||)``); the rest are recomputed by float64 differences
and accepted at ``d^2 <= r^2 (1 + ACCEPT_REL)``, as ``DatabaseShields._verified`` does.
"""
from __future__ import annotations

import numpy as np
import torch

from ..projection import gamma
from ..source import ACCEPT_REL

CHUNK_ROWS = 2048


def within_mask(q: np.ndarray, latents: np.ndarray, radius: float) -> np.ndarray:
    """Bool ``[n]``: fp16 ``latents [n, D]`` within ``radius`` of at least one float32 query ``q [B, D]``."""
    inside_any = np.zeros(len(latents), dtype=bool)
    if len(latents) == 0 or len(q) == 0:
        return inside_any
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    centre = qt.mean(0)
    qc = qt - centre
    qc_sq = qc.square().sum(1)
    u, g = 2.0 ** -24, gamma(q.shape[1] + 2, 2.0 ** -24)
    q_len = qc_sq.double().sqrt() * (1 + 2 * g)
    for start in range(0, len(latents), CHUNK_ROWS):
        raw = latents[start:start + CHUNK_ROWS].reshape(-1, q.shape[1])
        zc = torch.from_numpy(raw).float().sub_(centre)
        zc_sq = torch.linalg.vector_norm(zc, dim=1).square()
        scale = (qc_sq[:, None] + zc_sq[None, :]).double()
        d2 = (qc_sq[:, None] + zc_sq[None, :] - 2 * (qc @ zc.T)).double()
        slack = 2 * g * scale * (1 + 4 * g) + 1e-300
        shift = u * (q_len[:, None] + zc_sq.double().sqrt()[None, :] * (1 + 2 * g))
        upper = (d2 + slack).sqrt() + shift
        lower = (d2 - slack).clamp_min(0).sqrt() - shift
        inside = upper <= radius
        unsure = ((~inside) & (lower <= radius * (1 + ACCEPT_REL))).nonzero().tolist()
        if unsure:
            q64 = qt.double()
            for b, j in unsure:
                z64 = torch.from_numpy(raw[j].astype(np.float64))
                inside[b, j] = float((z64 - q64[b]).square().sum()) <= radius * radius * (1 + ACCEPT_REL)
        inside_any[start:start + len(raw)] = inside.any(0).numpy()
    return inside_any
