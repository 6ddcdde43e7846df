"""The exact acceptance test of :mod:`shield_db.exact`, for latents fetched from PostgreSQL instead of shards."""
from __future__ import annotations

import numpy as np

from ..exact import pair_mask

CHUNK_ROWS = 2048


def within_mask(q: np.ndarray, latents: np.ndarray, radius: float) -> np.ndarray:
    """Bool ``[n]``: fp16 ``latents [n, D]`` within ``radius`` of at least one float32 query ``q [B, D]``."""
    inside_any = np.zeros(len(latents), dtype=bool)
    if len(latents) == 0 or len(q) == 0:
        return inside_any
    for start in range(0, len(latents), CHUNK_ROWS):
        part = latents[start:start + CHUNK_ROWS]
        inside_any[start:start + len(part)] = pair_mask(q, part, radius).any(0).numpy()
    return inside_any
