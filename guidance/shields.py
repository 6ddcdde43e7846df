"""Shield sources: where SPELL asks for the shields within a radius of a prediction.

A *shield source* answers one question exactly: which shields lie within ``radius`` of any of these
queries. SPELL's correction only needs those (every other term of eq. 5 is zero), so a source may be a
tensor in memory (:class:`TensorShields`) or an index over a million shields on disk (``shield_db``),
as long as it never misses one. Extra candidates are allowed: SPELL recomputes exact distances.

:class:`ShieldSource` declares everything a caller may ask of a source (search, listing latents, mapping into
the model's space, moving to the sampling device, resizing for another pass); callers never ask which class a
source is, so a new kind of source is one new class. Views that combine sources (an affine map, several as one,
exclusions) are in :mod:`guidance.shield_views`; resizing for another pass size in :mod:`guidance.shield_resample`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from .feature_screen import FIT_SAMPLE_ROWS, FeatureScreen, fit_map, map_features, within_mask
from .kernels import diff_block_rows
from .shield_resample import resized_latents

# In-memory sets this large are screened through features on the query device; smaller ones are verified in full.
SCREEN_MIN_ROWS = 512
# Candidate latents moved to the query device and verified per chunk.
SCREEN_CHUNK_ROWS = 2048
NEAREST_PROBE = 16
NEAREST_CHUNK_ROWS = 2048


# What an indexed source answers when asked for a non-affine map (callers prefix their node's name).
NOT_MAPPABLE = ("this model's latent format is not a scalar affine map, so an indexed shield set cannot be searched "
                "in its space; load the shields as a LATENT batch instead")


class ShieldSource(Protocol):
    """What SPELL, its hooks and its report ask of a set of shields; every source class implements all of it.

    Indices (``nearest``, ``latents``) count the source's own shields ``0 .. len - 1``. A scalar affine map
    into the model's space needs nothing of the source (:func:`guidance.shield_views.model_space` wraps it in
    an ``AffineShields`` view); a general map is :meth:`mapped`.
    """

    item_shape: tuple[int, ...]     # shape of one shield, e.g. (4, 64, 64)

    def __len__(self) -> int: ...

    def within(self, queries: torch.Tensor, radius: float) -> torch.Tensor:
        """Every shield within ``radius`` of some query (a superset): float32 ``[M, *item_shape]``, queries' device."""

    def nearest(self, queries: torch.Tensor, reach: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest shield per query: ``(distance [B] float32, index [B] int64)``, exact for every query whose
        nearest shield lies within ``reach``. A query with none within ``reach`` may get ``(inf, -1)``: indexed
        sources answer so rather than measure most of their set; in-memory ones return the exact nearest anyway."""

    def latents(self, indices) -> torch.Tensor:
        """Shields ``indices`` as float32 ``[N, *item_shape]`` on the CPU (report thumbnails, resizing)."""

    def mapped(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ShieldSource:
        """This set seen through a general map ``fn`` (a latent format's ``process_in``); ValueError if it cannot be."""

    def on_device(self, device) -> ShieldSource:
        """This set ready for queries on ``device`` (the sampling device, once per run)."""

    def resampled(self, item_shape: tuple) -> ShieldSource:
        """This set resized to ``item_shape``'s height/width (a hires pass); ValueError if it cannot be."""


def flatten(x: torch.Tensor) -> torch.Tensor:
    """View a batch ``[B, ...]`` as ``[B, D]`` (also for an empty batch)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def exact_sq_distances(queries: torch.Tensor, shields: torch.Tensor) -> torch.Tensor:
    """``||q_b - z_k||^2`` by explicit differences in float32, chunked so no ``[B, K, D]`` tensor exists."""
    q = flatten(queries).float()
    z = flatten(shields).float()
    b, d = q.shape
    out = torch.empty(b, z.shape[0], dtype=torch.float32, device=q.device)
    step = diff_block_rows(b, d)
    for start in range(0, z.shape[0], step):
        block = z[start:start + step].to(q.device)
        out[:, start:start + step] = (q[:, None, :] - block[None, :, :]).square().sum(-1)
    return out


class TensorShields:
    """Shields held in memory, off the sampling device, with exact range search.

    The full latents stay on the CPU (fp16 when that is lossless or asked for with ``dtype=torch.float16``,
    else float32). A set of ``screen_min_rows`` or more is screened through 65-number features
    (:mod:`guidance.feature_screen`) kept on the device of the queries: one matmul per batch there, then only
    the candidates' latents are moved to that device and verified exactly (float32 with a rigorous bound,
    float64 where it cannot decide). Smaller sets are verified in full. A shield within ``r`` is never missed
    and every reported one is within ``r`` (closed ball).
    """

    def __init__(self, shields: torch.Tensor, dtype: torch.dtype | None = None,
                 screen_min_rows: int = SCREEN_MIN_ROWS):
        if shields.dim() < 2:
            raise ValueError(f"shields must be [K, ...] with at least one feature dim, got shape {tuple(shields.shape)}")
        check_finite(shields, "shields contain NaN or Inf")
        self.shields = stored_latents(shields.detach(), dtype)
        self.item_shape = tuple(shields.shape[1:])
        self.screen_min_rows = int(screen_min_rows)
        self._flat = flatten(self.shields)
        self._map = None           # (mu, A) float64 on the CPU, fitted on first use
        self._screens = {}         # device -> FeatureScreen (features resident there)

    def __len__(self) -> int:
        return self.shields.shape[0]

    @property
    def screened(self) -> bool:
        """True when queries go through the feature screen (else every shield is verified)."""
        return len(self) >= max(1, self.screen_min_rows)

    def to(self, device) -> TensorShields:
        """Place the features on ``device`` now (they would be on first use); the latents stay on the CPU."""
        if self.screened:
            self.screen(torch.device(device))
        return self

    def on_device(self, device) -> TensorShields:
        return self.to(device)

    def latents(self, indices) -> torch.Tensor:
        return self.shields[torch.as_tensor(indices, dtype=torch.long)].float()

    def mapped(self, fn) -> TensorShields:
        return TensorShields(fn(self.shields.clone()).float())

    def resampled(self, item_shape: tuple) -> TensorShields:
        return resampled_source(self, item_shape)

    def screen(self, device: torch.device) -> FeatureScreen:
        """The feature screen resident on ``device`` (features computed once, in float64 on the CPU)."""
        # No lock (a source must stay deep-copyable): two threads racing here compute the same deterministic map.
        if device not in self._screens:
            if self._map is None:
                sample = self._flat[torch.linspace(0, len(self) - 1, min(len(self), FIT_SAMPLE_ROWS)).long()]
                self._map = fit_map(sample)
            cpu = self._screens.get(torch.device("cpu"))
            if cpu is None:
                feats, norms = map_features(self._flat, *self._map)
                cpu = FeatureScreen(feats, float(norms.max()))
            self._screens[device] = cpu.to(device)
        return self._screens[device]

    def _queries(self, queries: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` float32, or float64 when given so (answers are exact for the query as given)."""
        q = flatten(queries)
        q = q if q.dtype == torch.float64 else q.float()
        if q.shape[1] != self._flat.shape[1]:
            raise ValueError(f"queries of shape {tuple(queries.shape[1:])} do not match shields of shape {self.item_shape}")
        check_finite(q, "queries contain NaN or Inf")
        return q

    def _candidates(self, q: torch.Tensor, radius) -> torch.Tensor:
        if not self.screened:
            return torch.arange(len(self))
        feats, norms = map_features(q, *self._map_for(q.device))
        return self.screen(q.device).candidates(feats, norms, radius)

    def _map_for(self, device: torch.device):
        self.screen(device)
        return self._map

    def within_indices(self, queries: torch.Tensor, radius: float) -> torch.Tensor:
        """Sorted indices (int64, CPU) of every shield within ``radius`` (closed ball) of at least one query."""
        if not (math.isfinite(radius) and radius >= 0):
            raise ValueError(f"radius must be finite and >= 0, got {radius}")
        q = self._queries(queries)
        cand = self._candidates(q, radius)
        if cand.numel() == 0:
            return cand
        return cand[within_mask(q, self._flat, radius, SCREEN_CHUNK_ROWS, rows=cand)]

    def within(self, queries: torch.Tensor, radius: float) -> torch.Tensor:
        idx = self.within_indices(queries, radius)
        return self._flat[idx].to(queries.device).float().reshape(-1, *self.item_shape)

    def nearest(self, queries: torch.Tensor, reach: float = math.inf):
        """Exact nearest shield per query: ``(distance [B] float32, index [B] int64)`` on the queries' device
        (in memory: exact at any distance, ``reach`` is not needed).

        Screened sets: the nearest rows in feature space give an upper bound ``U`` on the nearest distance;
        every shield that may lie within ``U`` (the range screen) is then measured by explicit differences.
        """
        q = self._queries(queries)
        best = torch.full((q.shape[0],), math.inf)
        best_idx = torch.zeros(q.shape[0], dtype=torch.long)
        if self.screened:
            feats, norms = map_features(q, *self._map_for(q.device))
            screen = self.screen(q.device)
            probes = screen.nearest_rows(feats, NEAREST_PROBE)
        for b in range(q.shape[0]):
            cand = torch.arange(len(self))
            if self.screened:
                d2, _ = self._nearest_of(q[b:b + 1], probes[b])
                bound = math.sqrt(d2) * (1 + 1e-6) + 1e-30
                cand = screen.candidates(feats[b:b + 1], norms[b:b + 1], bound)
            best[b], best_idx[b] = self._nearest_of(q[b:b + 1], cand)
        return best.sqrt().to(q.device), best_idx.to(q.device)

    def _nearest_of(self, q: torch.Tensor, rows: torch.Tensor) -> tuple[float, int]:
        """``(squared distance, index)`` of the nearest of ``rows`` to one query, by explicit float32 differences."""
        q = q.float()
        best, best_row = math.inf, -1
        for start in range(0, rows.numel(), NEAREST_CHUNK_ROWS):
            part = rows[start:start + NEAREST_CHUNK_ROWS]
            d2 = exact_sq_distances(q, self._flat[part])[0]
            i = int(d2.argmin())
            if float(d2[i]) < best:
                best, best_row = float(d2[i]), int(part[i])
        return best, best_row


def check_finite(x: torch.Tensor, message: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(flatten(x))).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"{message} at indices {bad[:10]}{'...' if len(bad) > 10 else ''}")


def stored_latents(shields: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The CPU copy SPELL compares against: fp16 if asked or lossless, else float32."""
    cpu = shields.to("cpu")
    if dtype is None:
        half = cpu.to(torch.float16)
        return half if torch.equal(half.float(), cpu.float()) else cpu.to(torch.float32, copy=True).contiguous()
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"shields are stored as torch.float16 or torch.float32, not {dtype}")
    stored = cpu.to(dtype, copy=True).contiguous()
    if not torch.isfinite(stored).all():
        raise ValueError(f"shields exceed the range of {dtype} (largest |value| {float(cpu.abs().max()):.4g}); "
                         f"store them as torch.float32")
    return stored


def resampled_source(source: ShieldSource, item_shape: tuple) -> TensorShields:
    """An in-memory copy of ``source`` (LATENT space) with every shield resized to ``item_shape``'s height/width;
    ValueError when channels or frames differ or the set is too large to hold resized
    (:func:`guidance.shield_resample.resized_latents`)."""
    return TensorShields(resized_latents(source, item_shape))
