"""Cells of the feature space (k-means), their radii, and which cells a query ball can touch.

A cell ``c`` stores a centre ``m_c`` and a radius ``R_c >= max ||f(z) - m_c||`` over its shields' stored features.
By the triangle inequality ``||f(q) - f(z)|| >= ||f(q) - m_c|| - R_c``, so a cell with ``||f(q) - m_c|| - R_c > rho``
holds no shield within feature distance ``rho`` of the query and is skipped; every other cell is scanned. Distances
here are float64 sums of at most 65 squares of float64 differences of float32/float64 numbers: relative error below
``70 * 2^-53``; :data:`CELL_REL` (1e-9) covers it with a wide margin in both directions.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..projection import feature_error

CELL_REL = 1e-9
KMEANS_ITERATIONS = 12
# Distance computations in SQL: cube's ``cube_distance`` sums in float64, pgvector's ``<->`` in float32. A sum of
# n non-negative rounded terms has relative error <= gamma_n, and the square root halves it: allow twice that.
SQL_DISTANCE_REL = {"cube": 1e-12, "vector": 2 * 70 * 2.0 ** -24}


def default_cell_count(rows: int) -> int:
    """About ``sqrt(rows)`` cells (so a cell holds about as many shields as there are cells), 1..4096."""
    return int(min(4096, max(1, round(math.sqrt(max(1, rows))))))


def kmeans(feats: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Centres ``[k', d]`` float64 (``k' <= k``, no empty cell) by Lloyd's iterations from a random sample.

    Only the pruning quality depends on these centres; exactness rests on the stored radii.
    """
    x = torch.from_numpy(np.asarray(feats, dtype=np.float64))
    k = max(1, min(int(k), len(x)))
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(KMEANS_ITERATIONS):
        label = torch.cdist(x, centres).argmin(1)
        count = torch.bincount(label, minlength=len(centres))
        sums = torch.zeros_like(centres).index_add_(0, label, x)
        keep = count > 0
        centres = sums[keep] / count[keep, None]
    return centres.numpy()


def assign(feats: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(cell [n] int64, bound [n] float64)``: the nearest centre and a rounding-safe upper bound of the distance."""
    x = np.asarray(feats, dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)
    approx = torch.cdist(torch.from_numpy(x), torch.from_numpy(c))  # matmul form: only used to choose
    cell = approx.argmin(1).numpy()
    exact = np.sqrt(((x - c[cell]) ** 2).sum(1))
    return cell.astype(np.int64), exact * (1 + CELL_REL) + 1e-300


def reach(radius: float, query_norms: np.ndarray, max_shield_norm: float) -> np.ndarray:
    """Per query, the stored-feature distance every true hit stays within (``shield_db.projection``'s bound)."""
    return radius + feature_error(np.asarray(query_norms, dtype=np.float64)) + feature_error(max_shield_norm)


def touched_cells(query_feats: np.ndarray, rho: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Boolean ``[n_cells]``: cells some query ball (feature radius ``rho[b]``) can touch."""
    q = np.asarray(query_feats, dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)
    dist = np.sqrt(((q[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    return ((dist * (1 - CELL_REL)) <= (np.asarray(radii)[None, :] + np.asarray(rho)[:, None])).any(0)


def sql_limit(rho: np.ndarray, feature_type: str) -> np.ndarray:
    """The bound to compare the server's computed feature distance with, so no true hit is filtered out."""
    return np.asarray(rho, dtype=np.float64) * (1 + SQL_DISTANCE_REL[feature_type]) + 1e-300
