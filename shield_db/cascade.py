"""Range screen on features as a cascade of prefix maps, each pass one folded float32 matrix product.

Level ``m`` of features ``f [n, k+1]`` is the prefix map ``p_m(f) = [f_1..f_m, ||f_(m+1..)||]``:
``||p_m(f) - p_m(g)||^2 = ||f_h - g_h||^2 + (||f_t|| - ||g_t||)^2 <= ||f - g||^2``, so a level never lengthens a
distance and ``||p_m(f)|| = ||f||``. The first level scans every row from a contiguous copy
``[p_m(f), ||p_m(f)||^2]``; each later level reads only the rows that survived (a prefix of the stored features and
their stored tail norm), the last one the full features.

A folded pass keeps row ``z`` for query ``q`` when ``fl([-2q, 1] . [z, s_z]) <= t_q`` with ``s_z = fl(||z||^2)``
and ``t_q = r2_q - ||q||^2`` rounded up. The float32 dot product of ``m + 2`` terms (any summation order) is
within ``gamma_{m+2} (2 |q| |z| + s_z)`` of the exact one and ``|s_z - ||z||^2| <= 2^-24 ||z||^2``: in all
``<= 2 gamma_{m+3} (||q||^2 + ||z||^2)``, inside the bound ``2 gamma_{k+3} (||q||^2 + ||z||^2)`` that
:func:`shield_db.projection.search_radius_sq` enlarges ``r2`` by twice. A level's rounding (its tail norm is
computed in float64 and rounded once) is inside ``FEATURE_REL_ERROR`` (``projection.check_feature_bound``).

Queries are padded to a multiple of 8 (copies of the first), so a row's 8 comparisons read as one ``uint64``.
"""
from __future__ import annotations

import numpy as np

CHUNK_ROWS = 16384      # rows per product of the linear first pass: its [chunk, 8] result stays in L2
BUILD_CHUNK_ROWS = 65536
LANES = 8


def prefix_features(feats: np.ndarray, m: int) -> np.ndarray:
    """``p_m(f) = [f_1..f_m, ||f_(m+1..)||]`` float32 of features ``[n, k+1]`` (tail norm in float64, rounded once).

    1-Lipschitz; ``||p^_m(f^) - p_m(f)|| <= ||f^ - f|| + 2^-23 ||f||`` (inside ``FEATURE_REL_ERROR``).
    """
    return np.concatenate([feats[:, :m], tail_norms(feats, m)[:, None]], 1)


def tail_norms(feats: np.ndarray, m: int) -> np.ndarray:
    """``||f_(m+1..)||`` summed in float64, rounded once to float32."""
    return np.sqrt(np.square(feats[:, m:], dtype=np.float64).sum(1)).astype(np.float32)


def squared_norms(feats: np.ndarray) -> np.ndarray:
    """``||f_i||^2`` summed in float64, rounded once to float32 (relative error <= 2^-24)."""
    return np.square(feats, dtype=np.float64).sum(1).astype(np.float32)


def fold_rows(feats: np.ndarray, feats_sq: np.ndarray) -> np.ndarray:
    """``[f, s_f]`` float32 ``[n, w + 1]``: rows of a folded pass."""
    return np.concatenate([feats, feats_sq[:, None]], 1)


def fold_queries(q: np.ndarray, r2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``([-2q, 1] [B', w + 1], t [B'])`` float32, ``B'`` the multiple of 8 above ``B``; ``t_q >= r2_q - ||q||^2``.

    ``-2q`` is exact; ``||q||^2`` is summed in float64 (relative error far below ``2^-40``) and ``t`` rounded up.
    """
    q_sq = np.square(q, dtype=np.float64).sum(1)
    limit = np.asarray(r2, np.float64) - q_sq + 2.0 ** -40 * q_sq
    limit = np.nextafter(limit.astype(np.float32), np.float32(np.inf))
    pad = -len(q) % LANES
    q_aug = np.concatenate([q * np.float32(-2), np.ones((len(q), 1), np.float32)], 1)
    if pad:
        q_aug = np.concatenate([q_aug, np.repeat(q_aug[:1], pad, 0)])
        limit = np.concatenate([limit, np.repeat(limit[:1], pad)])
    return np.ascontiguousarray(q_aug.T), limit


def folded_pass(q_aug_t: np.ndarray, limit: np.ndarray, rows: np.ndarray, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """Sorted ``i`` whose folded value is ``<= t_q`` for some query ``q`` (``rows [n, w + 1]`` from :func:`fold_rows`)."""
    lanes = q_aug_t.shape[1]
    found = []
    scores = np.empty((min(chunk, len(rows)), lanes), np.float32)
    keep = np.empty(scores.shape, bool)
    limits = np.tile(limit, (len(scores), 1))  # a contiguous operand: one long comparison loop, ~5x faster than [lanes]
    for lo in range(0, len(rows), chunk):
        block = rows[lo:lo + chunk]
        s = np.matmul(block, q_aug_t, out=scores[:len(block)])
        k = np.less_equal(s, limits[:len(block)], out=keep[:len(block)])
        hit = k.view(np.uint64)
        hit = hit[:, 0] if lanes == LANES else hit.any(1)
        found.append(lo + np.flatnonzero(hit))
    return np.concatenate(found) if found else np.zeros(0, np.int64)


class Cascade:
    """The screening arrays of stored features ``full [n, k+1]`` for prefix widths ``widths`` (increasing, < k+1).

    Memory beyond the stored features: ``widths[0] + 2`` float32 per row for the linear first pass, 2 per later
    level (tail norm and squared norm), 1 for the full features' squared norms.
    """

    def __init__(self, full: np.ndarray, widths: tuple[int, ...] = ()):
        self.full, self.widths = full, tuple(int(m) for m in widths)
        n, width = full.shape
        if any(not 0 < m < width - 1 for m in self.widths) or list(self.widths) != sorted(set(self.widths)):
            raise ValueError(f"prefix widths must increase strictly within (0, {width - 1}), got {widths}")
        chunks = [full[lo:lo + BUILD_CHUNK_ROWS] for lo in range(0, n, BUILD_CHUNK_ROWS)]
        self.full_sq = _concat([squared_norms(c) for c in chunks], (0,))
        if self.widths:
            m = self.widths[0]
            levels = [prefix_features(c, m) for c in chunks]
            self.first = _concat([fold_rows(p, squared_norms(p)) for p in levels], (0, m + 2))
        else:
            self.first = _concat([fold_rows(c, s) for c, s in zip(chunks, np.split(self.full_sq, _cuts(chunks)))],
                                 (0, width + 1))
        self.tails, self.level_sq = {}, {}
        for m in self.widths[1:]:
            tails = [tail_norms(c, m) for c in chunks]
            self.tails[m] = _concat(tails, (0,))
            self.level_sq[m] = _concat([squared_norms(np.concatenate([c[:, :m], t[:, None]], 1))
                                        for c, t in zip(chunks, tails)], (0,))

    def candidates(self, feats: np.ndarray, r2: np.ndarray) -> np.ndarray:
        """Sorted rows that pass every level for query features ``feats [B, k+1]`` and squared radii ``r2 [B]``."""
        width = self.full.shape[1]
        first = self.widths[0] if self.widths else None
        q = feats if first is None else prefix_features(feats, first)
        rows = folded_pass(*fold_queries(q, r2), self.first)
        if first is None:
            return rows
        for m in self.widths[1:]:
            g = np.empty((len(rows), m + 2), np.float32)
            g[:, :m] = self.full[rows, :m]  # reads only the prefix of each row
            g[:, m] = self.tails[m][rows]
            g[:, m + 1] = self.level_sq[m][rows]
            rows = rows[folded_pass(*fold_queries(prefix_features(feats, m), r2), g)]
        g = np.empty((len(rows), width + 1), np.float32)
        np.take(self.full, rows, axis=0, out=g[:, :width])
        g[:, width] = self.full_sq[rows]
        return rows[folded_pass(*fold_queries(feats, r2), g)]


def _concat(parts: list, empty_shape: tuple) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape, np.float32)


def _cuts(chunks: list) -> list:
    return np.cumsum([len(c) for c in chunks])[:-1].tolist()
