"""A database as a shield source (``guidance.shields.ShieldSource``): exact range and nearest search."""
from __future__ import annotations

import logging
import math

import faiss
import numpy as np
import torch

from .exact import keep_nearest, squared_distances, within_any
from .guidance_math import shields as _shields
from .projection import FeatureScreen, feature_error, features
from .resident import resident_budget
from .snapshot import Snapshot

NOT_MAPPABLE = _shields.NOT_MAPPABLE
resampled_source = _shields.resampled_source

LOG = logging.getLogger("shielded_sampling")
SCREENS = ("device", "index")
FEATURE_CHECK_ROWS = 8

DEFAULT_SMALL_SET_ROWS = 4096
VERIFY_CHUNK_ROWS = 2048
MAX_HITS = 65536
NEAREST_PROBE = 16
# Exact distances are computed in float64 from fp16 shields and float32 queries; relative error < D * 2^-52.


class IndexedSource:
    """What every indexed shield source (file database, PostgreSQL) does for ``guidance.shields.ShieldSource``
    beyond searching: it stays where it is stored and is only seen through scalar affine maps."""

    def mapped(self, fn):
        raise ValueError(NOT_MAPPABLE)

    def on_device(self, device):
        """Itself: searched where it is stored (a file database builds its device screen on the first query from
        an accelerator; PostgreSQL screens on the server); candidates are read on the CPU and verified on the
        queries' device."""
        return self

    def resampled(self, item_shape: tuple):
        """An in-memory copy resized to ``item_shape``'s height/width (small sets only)."""
        return resampled_source(self, item_shape)


class DatabaseShields(IndexedSource):
    """Every live shield of a :class:`Snapshot`, in stored (VAE latent) space.

    Indices (``nearest``, :meth:`latents`, :meth:`sources`, :meth:`thumbnails`) count live shields in row
    order. Range search: candidates from the projected features (a proven superset, see
    :mod:`shield_db.projection`), then exact distances on the fp16 latents read from the shards. Sets with
    fewer than ``small_set_rows`` shields skip the index and compare against all of them.

    ``screen="device"`` (default): queries from an accelerator (CUDA, MPS, ...) are screened there: the live
    rows' features stay resident on that device (129 float32 numbers per shield for new databases) and one
    matmul per batch screens them (:class:`guidance.feature_screen.FeatureScreen`, the same bound widened for
    that device's matmul rounding). Queries on the CPU use the index's own cascade CPU screen, which is faster
    there. ``screen="index"``: always the index's CPU screen (also the fallback when the stored features cannot
    be read back).

    ``resident_bytes`` (default :func:`shield_db.resident.resident_budget`, 1 GB): up to that many bytes of the
    snapshot's latents are held in RAM, so candidates are gathered, not read from the shards. The copy is filled
    in the background (opening stays as fast as before); until it is complete searches read the shards, with the
    same results (``snapshot.wait_held()`` waits for it).
    """

    def __init__(self, snapshot: Snapshot, small_set_rows: int = DEFAULT_SMALL_SET_ROWS, screen: str = "device",
                 resident_bytes: int | None = None):
        if screen not in SCREENS:
            raise ValueError(f"screen must be one of {list(SCREENS)}, got {screen!r}")
        snapshot.hold_latents(resident_budget() if resident_bytes is None else resident_bytes, wait=False)
        self.snapshot = snapshot
        self.item_shape = snapshot.item_shape
        self.rows = snapshot.live_rows
        self.use_index = snapshot.index is not None and len(self.rows) >= small_set_rows
        self.screen = screen
        live = np.zeros(snapshot.rows, dtype=bool)
        live[self.rows] = True
        self._live = live
        self._screens = {}      # device -> FeatureScreen over the live rows (None: use the index's CPU screen)

    def __len__(self) -> int:
        return len(self.rows)

    def _queries(self, queries: torch.Tensor) -> np.ndarray:
        q = queries.detach().to("cpu", torch.float32).reshape(queries.shape[0], -1)
        if q.shape[1] != int(np.prod(self.item_shape)):
            raise ValueError(f"queries of shape {tuple(queries.shape[1:])} do not match shields of shape {self.item_shape}")
        q = q.numpy()
        if not np.isfinite(q).all():
            raise ValueError("queries contain NaN or Inf")
        return q

    def _candidate_rows(self, q: np.ndarray, radius: float | np.ndarray, device=None) -> np.ndarray:
        if not self.use_index:
            return self.rows
        on_accelerator = device is not None and torch.device(device).type != "cpu"
        screen = self.device_screen(device) if self.screen == "device" and on_accelerator else None
        if screen is None:
            cand = self.snapshot.index.candidates(q, radius)
            return cand[self._live[cand]]
        index = self.snapshot.index
        feats, norms = features(q, index.mu, index.a)
        found = screen.candidates(torch.from_numpy(feats), torch.from_numpy(norms), radius)
        return self.rows[found.numpy()]

    def device_screen(self, device=None) -> FeatureScreen | None:
        """The live rows' features resident on ``device`` (default CPU), or None when they cannot be used."""
        device = torch.device("cpu" if device is None else device)
        if device not in self._screens:
            cpu = self._screens.get(torch.device("cpu"), False)
            if cpu is False:
                cpu = self._cpu_screen()
                self._screens[torch.device("cpu")] = cpu
            self._screens[device] = None if cpu is None else cpu.to(device)
        return self._screens[device]

    def _cpu_screen(self) -> FeatureScreen | None:
        """The stored float32 features of the live rows (a view of FAISS's own array when every row is live)."""
        index = self.snapshot.index
        try:
            flat = index.index
            width = int(flat.d)
            if len(self.rows) == index.rows:
                stored = np.asarray(faiss_rows(flat, index.rows, width))
            else:
                stored = faiss_rows(flat, index.rows, width)[self.rows]
        except (AttributeError, RuntimeError, TypeError) as exc:
            LOG.warning("shield_db: features of %s cannot be read back (%s); searching them with FAISS instead",
                        self.snapshot.folder, exc)
            return None
        if not self._features_match(stored):
            return None
        return FeatureScreen(torch.from_numpy(stored), index.max_norm, feature_error(1.0))

    def _features_match(self, stored: np.ndarray) -> bool:
        """Recompute a few live rows' features: the stored ones must be the map the queries go through."""
        pick = np.unique(np.linspace(0, len(self.rows) - 1, min(FEATURE_CHECK_ROWS, len(self.rows))).astype(np.int64))
        index = self.snapshot.index
        fresh, norms = features(self.snapshot.read_rows(self.rows[pick]), index.mu, index.a)
        gap = np.linalg.norm(fresh.astype(np.float64) - stored[pick], axis=1)
        if fresh.shape[1] == stored.shape[1] and (gap <= 2 * feature_error(norms) + 1e-30).all():
            return True
        LOG.warning("shield_db: stored features of %s do not match the feature map; searching them with FAISS "
                    "instead", self.snapshot.folder)
        return False

    def _exact_sq(self, q: np.ndarray, rows: np.ndarray):
        """Yield ``(rows chunk, fp16 latents, squared distances [B, chunk] float64)``."""
        for start in range(0, len(rows), VERIFY_CHUNK_ROWS):
            part = rows[start:start + VERIFY_CHUNK_ROWS]
            z = self.snapshot.read_rows(part)
            yield part, z, squared_distances(q, z)

    def within_rows(self, queries: torch.Tensor, radius: float) -> np.ndarray:
        """Sorted live global rows within ``radius`` (closed ball) of at least one query; candidates are
        verified by :func:`shield_db.exact.within_any` on the queries' device (float32 with a rigorous bound for
        that device, float64 where in doubt)."""
        if not math.isfinite(radius) or radius < 0:
            raise ValueError(f"radius must be finite and >= 0, got {radius}")
        q = self._queries(queries)
        cand = self._candidate_rows(q, radius, queries.device)
        check = torch.from_numpy(q).to(queries.device)
        hits = [part[inside] for part, inside in self._verified(check, cand, radius)]
        found = np.concatenate(hits) if hits else np.zeros(0, np.int64)
        if len(found) > MAX_HITS:
            raise ValueError(f"radius {radius} puts {len(found)} shields (more than {MAX_HITS}) within reach of the "
                             f"queries; lower the radius")
        return found

    def _verified(self, q: torch.Tensor, rows: np.ndarray, radius: float):
        """Yield ``(rows chunk, bool mask of rows within radius of a query)``, checked on ``q``'s device."""
        for start in range(0, len(rows), VERIFY_CHUNK_ROWS):
            part = rows[start:start + VERIFY_CHUNK_ROWS]
            yield part, within_any(q, self.snapshot.read_rows(part), radius)

    def within(self, queries: torch.Tensor, radius: float) -> torch.Tensor:
        rows = self.within_rows(queries, radius)
        z = torch.from_numpy(self.snapshot.read_rows(rows).astype(np.float32))
        return z.to(queries.device)

    def nearest(self, queries: torch.Tensor, reach: float = math.inf):
        """Exact nearest live shield; ``(inf, -1)`` for a query with none within ``reach`` when the set is searched
        through its index: an upper bound per query from feature-space neighbours, then one exact range search for
        the batch, each query within the smaller of its bound and ``reach`` (a query far from every shield would
        otherwise measure most of the set). Sets below ``small_set_rows`` are measured in full and answer the exact
        nearest at any distance."""
        q = self._queries(queries)
        rows = self.rows
        if self.use_index:
            bounds = np.minimum(self._probe_bounds(q), reach)
            if np.isfinite(bounds).all():
                rows = self._candidate_rows(q, bounds, queries.device)
        best = np.full(len(q), np.inf)
        best_row = np.full(len(q), -1, np.int64)
        for part, _, d2 in self._exact_sq(q, rows):
            keep_nearest(best, best_row, part, d2)
        if self.use_index:   # the union holds every query's own candidates, so each nearest within reach is found
            beyond = best > reach * reach
            best[beyond], best_row[beyond] = np.inf, -1
        index = np.where(best_row >= 0, np.searchsorted(self.rows, best_row), -1)
        dist = torch.from_numpy(np.sqrt(best).astype(np.float32)).to(queries.device)
        return dist, torch.from_numpy(index).to(queries.device)

    def _probe_bounds(self, q: np.ndarray) -> np.ndarray:
        """``[B]`` true distances (rounded up) from each query to some live shield: its feature-space neighbours
        (one search for the batch); ``inf`` where none of them is live."""
        probes = self.snapshot.index.nearest_candidates(q, NEAREST_PROBE)
        bounds = np.full(len(q), np.inf)
        for b, probe in enumerate(probes):
            probe = probe[probe >= 0]
            probe = probe[self._live[probe]]
            if len(probe):
                _, _, d2 = next(self._exact_sq(q[b:b + 1], np.sort(probe)))
                bounds[b] = math.sqrt(float(d2.min())) * (1 + 1e-6) + 1e-30
        return bounds

    def latents(self, indices) -> torch.Tensor:
        return torch.from_numpy(self.snapshot.read_rows(self.rows[np.asarray(indices, np.int64)]).astype(np.float32))

    def sources(self, indices) -> list[str]:
        return [self.snapshot.live_sources[int(i)] for i in np.asarray(indices).reshape(-1)]

    def thumbnails(self, indices) -> torch.Tensor | None:
        """Stored RGB previews ``uint8 [N, t, t, 3]`` of live shields, or ``None`` when none were stored."""
        thumbs = self.snapshot.read_thumbnails(self.rows[np.asarray(indices, np.int64).reshape(-1)])
        return None if thumbs is None else torch.from_numpy(thumbs)


def faiss_rows(flat_index, rows: int, width: int) -> np.ndarray:
    """``[rows, width]`` float32 vectors of a flat FAISS index: its own storage, not a copy."""
    return faiss.rev_swig_ptr(flat_index.get_xb(), rows * width).reshape(rows, width)
