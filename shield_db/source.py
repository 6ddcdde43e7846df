"""A database as a shield source (protocol of ``guidance.shields``): exact range and nearest search."""
from __future__ import annotations

import math

import numpy as np
import torch

from .snapshot import Snapshot
from .projection import gamma

DEFAULT_SMALL_SET_ROWS = 4096
VERIFY_CHUNK_ROWS = 2048
MAX_HITS = 65536
NEAREST_PROBE = 16
# Exact distances are computed in float64 from fp16 shields and float32 queries; relative error < D * 2^-52.
ACCEPT_REL = 1e-9


class DatabaseShields:
    """Every live shield of a :class:`Snapshot`, in stored (VAE latent) space.

    Indices (``nearest``, :meth:`latents`, :meth:`sources`, :meth:`thumbnails`) count live shields in row
    order. Range search: projected-feature FAISS candidates (a proven superset, see
    :mod:`shield_db.projection`), then exact float64 distances on the memory-mapped fp16 latents. Sets with
    fewer than ``small_set_rows`` shields skip the index and compare against all of them.
    """

    def __init__(self, snapshot: Snapshot, small_set_rows: int = DEFAULT_SMALL_SET_ROWS):
        self.snapshot = snapshot
        self.item_shape = snapshot.item_shape
        self.rows = snapshot.live_rows
        self.use_index = snapshot.index is not None and len(self.rows) >= small_set_rows
        live = np.zeros(snapshot.rows, dtype=bool)
        live[self.rows] = True
        self._live = live

    def __len__(self) -> int:
        return len(self.rows)

    def _queries(self, queries: torch.Tensor) -> np.ndarray:
        q = queries.detach().to("cpu", torch.float32).reshape(queries.shape[0], -1)
        if q.shape[1] != int(np.prod(self.item_shape)):
            raise ValueError(f"queries of shape {tuple(queries.shape[1:])} do not match shields of shape {self.item_shape}")
        if not torch.isfinite(q).all():
            raise ValueError("queries contain NaN or Inf")
        return q.numpy()

    def _candidate_rows(self, q: np.ndarray, radius: float) -> np.ndarray:
        if not self.use_index:
            return self.rows
        cand = self.snapshot.index.candidates(q, radius)
        return cand[self._live[cand]]

    def _exact_sq(self, q: np.ndarray, rows: np.ndarray):
        """Yield ``(rows chunk, fp16 latents, squared distances [B, chunk] float64)``."""
        q64 = torch.from_numpy(q.astype(np.float64))
        for start in range(0, len(rows), VERIFY_CHUNK_ROWS):
            part = rows[start:start + VERIFY_CHUNK_ROWS]
            z = self.snapshot.read_rows(part)
            z64 = torch.from_numpy(z.reshape(len(part), -1).astype(np.float64))
            d2 = torch.stack([(z64 - qb).square().sum(1) for qb in q64])
            yield part, z, d2

    def within_rows(self, queries: torch.Tensor, radius: float) -> np.ndarray:
        """Sorted live global rows within ``radius`` (closed ball) of at least one query.

        Candidates are screened in float32 around the queries' mean ``c``: ``d2 = ||q'||^2 + ||z'||^2 - 2 q'.z'``
        with ``q' = fl(q - c)``, ``z' = fl(z - c)``. Rounding moves ``||q' - z'||`` from ``||q - z||`` by at most
        ``u (||q - c|| + ||z - c||)`` and ``d2`` from ``||q' - z'||^2`` by at most ``2 gamma_{D+2} (||q'||^2 +
        ||z'||^2)`` (Higham, any summation order); only pairs these bounds cannot decide are recomputed by
        float64 differences.
        """
        if not math.isfinite(radius) or radius < 0:
            raise ValueError(f"radius must be finite and >= 0, got {radius}")
        q = self._queries(queries)
        cand = self._candidate_rows(q, radius)
        hits = [part[inside] for part, inside in self._verified(q, cand, radius)]
        found = np.concatenate(hits) if hits else np.zeros(0, np.int64)
        if len(found) > MAX_HITS:
            raise ValueError(f"radius {radius} puts {len(found)} shields (more than {MAX_HITS}) within reach of the "
                             f"queries; lower the radius")
        return found

    def _verified(self, q: np.ndarray, rows: np.ndarray, radius: float):
        """Yield ``(rows chunk, bool mask of rows within radius of a query)``: float32 screen, float64 on doubt."""
        centre = torch.from_numpy(q).mean(0)
        qc = torch.from_numpy(q) - centre
        qc_sq = qc.square().sum(1)
        u, g = 2.0 ** -24, gamma(q.shape[1] + 2, 2.0 ** -24)
        q_len = qc_sq.double().sqrt() * (1 + 2 * g)
        for start in range(0, len(rows), VERIFY_CHUNK_ROWS):
            part = rows[start:start + VERIFY_CHUNK_ROWS]
            raw = self.snapshot.read_rows(part).reshape(len(part), -1)
            zc = torch.from_numpy(raw).float().sub_(centre)  # in place: the fp16 -> f32 copy is the costly pass
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
                q64 = torch.from_numpy(q.astype(np.float64))
                for b, j in unsure:
                    z64 = torch.from_numpy(raw[j].astype(np.float64))
                    inside[b, j] = float((z64 - q64[b]).square().sum()) <= radius * radius * (1 + ACCEPT_REL)
            yield part, inside.any(0).numpy()

    def within(self, queries: torch.Tensor, radius: float) -> torch.Tensor:
        rows = self.within_rows(queries, radius)
        z = torch.from_numpy(self.snapshot.read_rows(rows).astype(np.float32))
        return z.to(queries.device)

    def nearest(self, queries: torch.Tensor):
        """Exact nearest live shield: an upper bound from feature-space neighbours, then an exact range search."""
        q = self._queries(queries)
        best = np.full(len(q), np.inf)
        best_row = np.zeros(len(q), np.int64)
        for b in range(len(q)):
            rows = self.rows
            if self.use_index:
                probe = self.snapshot.index.nearest_candidates(q[b:b + 1], NEAREST_PROBE)[0]
                probe = probe[(probe >= 0)]
                probe = probe[self._live[probe]]
                if len(probe):
                    _, _, d2 = next(self._exact_sq(q[b:b + 1], np.sort(probe)))
                    bound = math.sqrt(float(d2.min())) * (1 + 1e-6) + 1e-30
                    rows = self._candidate_rows(q[b:b + 1], bound)
            for part, _, d2 in self._exact_sq(q[b:b + 1], rows):
                i = int(d2[0].argmin())
                if float(d2[0, i]) < best[b]:
                    best[b], best_row[b] = float(d2[0, i]), int(part[i])
        index = np.searchsorted(self.rows, best_row)
        dist = torch.from_numpy(np.sqrt(best).astype(np.float32)).to(queries.device)
        return dist, torch.from_numpy(index).to(queries.device)

    def latents(self, indices) -> torch.Tensor:
        return torch.from_numpy(self.snapshot.read_rows(self.rows[np.asarray(indices, np.int64)]).astype(np.float32))

    def sources(self, indices) -> list[str]:
        return [self.snapshot.live_sources[int(i)] for i in np.asarray(indices).reshape(-1)]

    def thumbnails(self, indices) -> torch.Tensor | None:
        """Stored RGB previews ``uint8 [N, t, t, 3]`` of live shields, or ``None`` when none were stored."""
        thumbs = self.snapshot.read_thumbnails(self.rows[np.asarray(indices, np.int64).reshape(-1)])
        return None if thumbs is None else torch.from_numpy(thumbs)
