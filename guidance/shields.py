"""Shield sources: where SPELL asks for the shields within a radius of a prediction.

A *shield source* answers one question exactly: which shields lie within ``radius`` of any of these
queries. SPELL's correction only needs those (every other term of eq. 5 is zero), so a source may be a
tensor in memory (:class:`TensorShields`) or an index over a million shields on disk (``shield_db``),
as long as it never misses one. Extra candidates are allowed: SPELL recomputes exact distances.

:class:`ShieldSource` declares everything a caller may ask of a source (search, listing latents, mapping into
the model's space, moving to the sampling device, resizing for another pass); callers never ask which class a
source is, so a new kind of source is one new class.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from .feature_screen import FIT_SAMPLE_ROWS, FeatureScreen, fit_map, map_features, within_mask
from .kernels import diff_block_rows

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
    into the model's space needs nothing of the source (:func:`model_space` wraps it in
    :class:`AffineShields`); a general map is :meth:`mapped`.
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


def model_space(source: ShieldSource, process_in: Callable, affine: tuple[float, float] | None) -> ShieldSource:
    """``source`` (LATENT space) as the model sees it: a view through ``affine = (scale, shift)`` when
    ``process_in(x) == scale * (x - shift)``, else ``source.mapped(process_in)``."""
    return source.mapped(process_in) if affine is None else AffineShields(source, *affine)


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


class AffineShields:
    """A source seen through ``x -> scale * (x - shift)`` (scalar scale and shift).

    ComfyUI diffuses in ``process_in(latent)`` space while shields are stored as plain latents; for the
    image latent formats that map is ``(latent - shift) * scale``, which scales every distance by
    ``|scale|``. Queries and radius are mapped into the stored space, answers mapped back.
    """

    def __init__(self, source, scale: float, shift: float = 0.0):
        if scale == 0 or not math.isfinite(scale) or not math.isfinite(shift):
            raise ValueError(f"AffineShields needs a finite non-zero scale and finite shift, got scale={scale}, shift={shift}")
        self.source, self.scale, self.shift = source, float(scale), float(shift)
        self.item_shape = source.item_shape

    def __len__(self) -> int:
        return len(self.source)

    def _to_source(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + self.shift

    def within(self, queries: torch.Tensor, radius: float) -> torch.Tensor:
        found = self.source.within(self._to_source(queries), radius / abs(self.scale))
        return (found.float() - self.shift) * self.scale

    def nearest(self, queries: torch.Tensor, reach: float = math.inf):
        dist, idx = self.source.nearest(self._to_source(queries), reach / abs(self.scale))
        return dist * abs(self.scale), idx

    def latents(self, indices) -> torch.Tensor:
        return (self.source.latents(indices).float() - self.shift) * self.scale

    def mapped(self, fn) -> ShieldSource:
        return self.source.mapped(lambda z: fn((z.float() - self.shift) * self.scale))

    def on_device(self, device) -> AffineShields:
        return AffineShields(self.source.on_device(device), self.scale, self.shift)

    def resampled(self, item_shape: tuple) -> AffineShields:
        """Resizing (weights summing to one) commutes with a scalar affine map: resize the source, keep the view."""
        return AffineShields(self.source.resampled(item_shape), self.scale, self.shift)


class ConcatShields:
    """Several sources searched as one (e.g. a protected set plus the run history)."""

    def __init__(self, sources):
        self.sources = [s for s in sources if s is not None and len(s) > 0]
        if not self.sources:
            raise ValueError("ConcatShields needs at least one non-empty source")
        shapes = {tuple(s.item_shape) for s in self.sources}
        if len(shapes) != 1:
            raise ValueError(f"shield sources disagree on item shape: {sorted(shapes)}")
        self.item_shape = self.sources[0].item_shape

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def within(self, queries: torch.Tensor, radius: float) -> torch.Tensor:
        return torch.cat([s.within(queries, radius).float().to(queries.device) for s in self.sources])

    def nearest(self, queries: torch.Tensor, reach: float = math.inf):
        offset, best, best_idx = 0, None, None
        for s in self.sources:
            dist, idx = s.nearest(queries, reach)
            dist, idx = dist.to(queries.device), idx.to(queries.device)
            idx = torch.where(idx >= 0, idx + offset, idx)
            if best is None:
                best, best_idx = dist, idx
            else:
                better = dist < best
                best, best_idx = torch.where(better, dist, best), torch.where(better, idx, best_idx)
            offset += len(s)
        return best, best_idx

    def latents(self, indices) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < len(self)):
            raise IndexError(f"shield indices must lie in 0 .. {len(self) - 1}, got {idx.tolist()[:10]}")
        out, offset = torch.empty(idx.numel(), *self.item_shape), 0
        for s in self.sources:
            mine = (idx >= offset) & (idx < offset + len(s))
            if mine.any():
                out[mine] = s.latents((idx[mine] - offset).tolist()).float()
            offset += len(s)
        return out

    def mapped(self, fn) -> ConcatShields:
        return ConcatShields([s.mapped(fn) for s in self.sources])

    def on_device(self, device) -> ConcatShields:
        return ConcatShields([s.on_device(device) for s in self.sources])

    def resampled(self, item_shape: tuple) -> TensorShields:
        return resampled_source(self, item_shape)


# A set larger than this is not resampled in memory (hires passes): the user loads it at the new size instead.
MAX_RESAMPLED_SHIELDS = 4096
RESAMPLE_CHUNK = 256


def resample_latents(latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of latents ``[K, C, H, W]`` or ``[K, C, T, H, W]`` to ``size = (H', W')`` per frame.

    Antialiased when shrinking, so a shield compared at a smaller size is its low-pass, not an aliased sample.
    """
    if latents.dim() not in (4, 5):
        raise ValueError(f"resample_latents needs [K, C, H, W] or [K, C, T, H, W], got shape {tuple(latents.shape)}")
    if tuple(latents.shape[-2:]) == tuple(size):
        return latents.float()
    lead = latents.shape[:-2]
    flat = latents.float().reshape(-1, 1, *latents.shape[-2:])
    shrink = size[0] < latents.shape[-2] or size[1] < latents.shape[-1]
    out = torch.cat([torch.nn.functional.interpolate(flat[s:s + RESAMPLE_CHUNK * 16], size=size, mode="bilinear",
                                                     align_corners=False, antialias=shrink)
                     for s in range(0, flat.shape[0], RESAMPLE_CHUNK * 16)])
    return out.reshape(*lead, *size)


def resampled_source(source: ShieldSource, item_shape: tuple) -> TensorShields:
    """An in-memory copy of ``source`` (LATENT space) with every shield resized to ``item_shape``'s height/width.

    Raises ValueError when channels or frames differ (those cannot be resampled meaningfully) or when the set
    is too large to hold a resized copy.
    """
    have, want = tuple(source.item_shape), tuple(item_shape)
    if len(have) != len(want) or have[:-2] != want[:-2]:
        raise ValueError(resample_mismatch(have, want))
    if len(source) > MAX_RESAMPLED_SHIELDS:
        raise ValueError(f"{len(source)} shields are too many to resize in memory (limit {MAX_RESAMPLED_SHIELDS})")
    latents = all_latents(source)
    return TensorShields(resample_latents(latents, want[-2:]))


def resample_mismatch(have: tuple, want: tuple) -> str:
    """Name the dimension that differs between shields ``have`` and latents ``want`` (not width/height)."""
    if len(have) != len(want):
        kinds = {3: "image latents (C x H x W)", 4: "video latents (C x T x H x W)"}
        return (f"shields are {kinds.get(len(have), f'{len(have)}-D')} but the sampled latent is "
                f"{kinds.get(len(want), f'{len(want)}-D')}")
    if have[0] != want[0]:
        return f"shields have {have[0]} latent channels but the sampled latent has {want[0]} (another model family)"
    return f"shields have {have[1]} latent frames but the sampled latent has {want[1]} (C x T x H x W)"


def all_latents(source: ShieldSource) -> torch.Tensor:
    """Every shield of a source as one float32 tensor on the CPU, read ``RESAMPLE_CHUNK`` at a time."""
    chunks = [source.latents(list(range(s, min(s + RESAMPLE_CHUNK, len(source)))))
              for s in range(0, len(source), RESAMPLE_CHUNK)]
    return torch.cat(chunks).float() if chunks else torch.zeros(0, *source.item_shape)


class ExcludedShields:
    """A source minus some of its shields (given by value, exactly as the source returns them).

    Used to leave out the shield an img2img / inpaint input image itself lies in. ``within`` drops rows equal
    to an excluded shield; ``nearest`` reports the nearest remaining shield (index -1 when that is not the
    source's own nearest).
    """

    NEAREST_GROWTH_ROUNDS = 20
    # Exclusion compares values bit for bit, which a map or a resize of the source would not keep.
    NOT_REMADE = ("shields are excluded last, in the space and at the size the run compares them: map or resize "
                  "the source first, then exclude")

    def __init__(self, source, excluded: torch.Tensor):
        self.source = source
        self.item_shape = source.item_shape
        self.excluded = flatten(excluded).float()

    def __len__(self) -> int:
        return max(0, len(self.source) - self.excluded.shape[0])

    def _keep(self, found: torch.Tensor) -> torch.Tensor:
        if found.shape[0] == 0 or self.excluded.shape[0] == 0:
            return found
        flat = flatten(found).float()
        excl = self.excluded.to(flat.device)
        same = torch.stack([(flat == e).all(-1) for e in excl]).any(0)
        return found[~same]

    def within(self, queries: torch.Tensor, radius: float) -> torch.Tensor:
        return self._keep(self.source.within(queries, radius))

    def nearest(self, queries: torch.Tensor, reach: float = math.inf):
        dist, idx = self.source.nearest(queries, reach)
        dist, idx = dist.clone(), idx.clone()
        for b in range(queries.shape[0]):
            if not math.isfinite(float(dist[b])):
                continue  # none within reach in the source: none in what is left of it
            ball = float(dist[b]) * (1 + 1e-6) + 1e-12
            if self._keep(self.source.within(queries[b:b + 1], ball)).shape[0] > 0:
                continue
            dist[b], idx[b] = math.inf, -1
            ball = max(ball, 1e-6 * (1.0 + float(flatten(queries[b:b + 1]).float().norm())))
            for _ in range(self.NEAREST_GROWTH_ROUNDS):
                if ball >= reach:
                    break
                ball = min(4 * ball, reach)
                found = self._keep(self.source.within(queries[b:b + 1], ball))
                if found.shape[0]:
                    d = (flatten(found).float() - flatten(queries[b:b + 1]).float().to(found.device)).norm(dim=1)
                    dist[b] = d.min().to(dist.device)
                    break
        return dist, idx

    def latents(self, indices) -> torch.Tensor:
        """Shields of the underlying source (``nearest`` reports its indices)."""
        return self.source.latents(indices)

    def mapped(self, fn) -> ShieldSource:
        raise ValueError(self.NOT_REMADE)

    def on_device(self, device) -> ExcludedShields:
        return ExcludedShields(self.source.on_device(device), self.excluded.reshape(-1, *self.item_shape))

    def resampled(self, item_shape: tuple) -> ShieldSource:
        raise ValueError(self.NOT_REMADE)
