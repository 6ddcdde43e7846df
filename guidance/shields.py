"""Shield sources: where SPELL asks for the shields within a radius of a prediction.

A *shield source* answers one question exactly: which shields lie within ``radius`` of any of these
queries. SPELL's correction only needs those (every other term of eq. 5 is zero), so a source may be a
tensor in memory (:class:`TensorShields`) or an index over a million shields on disk (``shield_db``),
as long as it never misses one. Extra candidates are allowed: SPELL recomputes exact distances.

Protocol (duck-typed)::

    item_shape: tuple[int, ...]                     # shape of one shield, e.g. (4, 64, 64)
    __len__() -> int
    within(queries [B, *item_shape], radius) -> Tensor [M, *item_shape]   # float32, superset of hits
    nearest(queries [B, *item_shape]) -> (distance [B] float32, index [B] int64)
"""
from __future__ import annotations

import math

import torch

# Elements of one [B, chunk, D] difference block kept in memory at once (float32: 4 bytes each).
DIFF_BLOCK_ELEMENTS = 16 * 1024 * 1024
# Rows of the shield matrix handled per matmul screening step.
SCREEN_CHUNK_ROWS = 4096


def flatten(x: torch.Tensor) -> torch.Tensor:
    """View a batch ``[B, ...]`` as ``[B, D]`` (also for an empty batch)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def exact_sq_distances(queries: torch.Tensor, shields: torch.Tensor) -> torch.Tensor:
    """``||q_b - z_k||^2`` by explicit differences in float32, chunked so no ``[B, K, D]`` tensor exists."""
    q = flatten(queries).float()
    z = flatten(shields).float()
    b, d = q.shape
    out = torch.empty(b, z.shape[0], dtype=torch.float32, device=q.device)
    step = max(1, DIFF_BLOCK_ELEMENTS // max(1, b * d))
    for start in range(0, z.shape[0], step):
        block = z[start:start + step].to(q.device)
        out[:, start:start + step] = (q[:, None, :] - block[None, :, :]).square().sum(-1)
    return out


def matmul_unit_roundoff(device: torch.device) -> float:
    """Unit roundoff of a float32 matmul on ``device`` (TF32 keeps only 10 mantissa bits)."""
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 2.0 ** -11
    return torch.finfo(torch.float32).eps / 2


def screening_tolerance(q_sq: torch.Tensor, z_sq: torch.Tensor, dim: int, unit_roundoff: float) -> torch.Tensor:
    """Bound on the float error of ``||q||^2 + ||z||^2 - 2 q.z`` (Higham: ``|err(q.z)| <= gamma_D |q||z|``)."""
    n_u = (dim + 4) * unit_roundoff
    gamma = n_u / (1 - n_u) if n_u < 0.5 else 1.0
    return 2 * gamma * (q_sq[:, None] + z_sq[None, :])


class TensorShields:
    """Shields held as one tensor; exact range search by float32 matmul screening + exact verification.

    The expansion ``||a||^2 + ||b||^2 - 2ab`` is fast but loses precision for large norms, so it is only
    used to *screen* with a rigorous rounding-error margin; every survivor is verified by explicit
    differences. Nothing is missed, and no ``[B, K, D]`` tensor is built.
    """

    def __init__(self, shields: torch.Tensor):
        if shields.dim() < 2:
            raise ValueError(f"shields must be [K, ...] with at least one feature dim, got shape {tuple(shields.shape)}")
        if not torch.isfinite(shields).all():
            bad = (~torch.isfinite(flatten(shields))).any(-1).nonzero().flatten().tolist()
            raise ValueError(f"shields contain NaN or Inf at indices {bad[:10]}{'...' if len(bad) > 10 else ''}")
        self.shields = shields
        self.item_shape = tuple(shields.shape[1:])
        self._flat = flatten(shields).float()
        self._sq_norms = self._flat.square().sum(-1)

    def __len__(self) -> int:
        return self.shields.shape[0]

    def to(self, device) -> "TensorShields":
        if self.shields.device == torch.device(device):
            return self
        return TensorShields(self.shields.to(device))

    def _screened(self, queries: torch.Tensor, radius: float):
        """Yield ``(start, candidate mask [B, chunk])`` for shields that may lie within ``radius``."""
        q = flatten(queries).float().to(self._flat.device)
        q_sq = q.square().sum(-1)
        dim = q.shape[1]
        u = matmul_unit_roundoff(q.device)
        for start in range(0, len(self), SCREEN_CHUNK_ROWS):
            z = self._flat[start:start + SCREEN_CHUNK_ROWS]
            z_sq = self._sq_norms[start:start + SCREEN_CHUNK_ROWS]
            approx = q_sq[:, None] + z_sq[None, :] - 2 * (q @ z.T)
            yield start, approx <= radius * radius + screening_tolerance(q_sq, z_sq, dim, u)

    def within_indices(self, queries: torch.Tensor, radius: float) -> torch.Tensor:
        """Sorted indices of every shield within ``radius`` (closed ball) of at least one query."""
        hits = []
        for start, mask in self._screened(queries, radius):
            cand = mask.any(0).nonzero().flatten()
            if cand.numel() == 0:
                continue
            idx = cand + start
            exact = exact_sq_distances(queries, self._flat[idx])
            hits.append(idx[(exact <= radius * radius).any(0)])
        if not hits:
            return torch.empty(0, dtype=torch.long, device=self._flat.device)
        return torch.cat(hits)

    def within(self, queries: torch.Tensor, radius: float) -> torch.Tensor:
        return self._flat[self.within_indices(queries, radius)].reshape(-1, *self.item_shape)

    def nearest(self, queries: torch.Tensor):
        """Exact nearest shield per query: ``(distance [B], index [B])``.

        Screens with the matmul expansion (upper bound on the nearest squared distance plus the rounding
        margin), then verifies the few survivors by explicit differences.
        """
        q = flatten(queries).float().to(self._flat.device)
        q_sq = q.square().sum(-1)
        u = matmul_unit_roundoff(q.device)
        approx = torch.cat([q_sq[:, None] + self._sq_norms[None, s:s + SCREEN_CHUNK_ROWS]
                            - 2 * (q @ self._flat[s:s + SCREEN_CHUNK_ROWS].T)
                            for s in range(0, len(self), SCREEN_CHUNK_ROWS)], dim=1)
        tol = screening_tolerance(q_sq, self._sq_norms, q.shape[1], u)
        bound = (approx + tol).min(1, keepdim=True).values
        best = torch.full((q.shape[0],), math.inf, device=q.device)
        best_idx = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for b in range(q.shape[0]):
            cand = (approx[b] - tol[b] <= bound[b]).nonzero().flatten()
            d2 = exact_sq_distances(q[b:b + 1], self._flat[cand])[0]
            best[b], best_idx[b] = d2.min(), cand[d2.argmin()]
        return best.sqrt(), best_idx


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

    def nearest(self, queries: torch.Tensor):
        dist, idx = self.source.nearest(self._to_source(queries))
        return dist * abs(self.scale), idx


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

    def nearest(self, queries: torch.Tensor):
        offset, best, best_idx = 0, None, None
        for s in self.sources:
            dist, idx = s.nearest(queries)
            dist, idx = dist.to(queries.device), idx.to(queries.device) + offset
            if best is None:
                best, best_idx = dist, idx
            else:
                better = dist < best
                best, best_idx = torch.where(better, dist, best), torch.where(better, idx, best_idx)
            offset += len(s)
        return best, best_idx


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


def resampled_source(source, item_shape: tuple) -> TensorShields:
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


def all_latents(source) -> torch.Tensor:
    """Every shield of a source as one float32 tensor (in-memory sets, databases, concatenations)."""
    if isinstance(source, TensorShields):
        return source.shields.float().cpu()
    if isinstance(source, ConcatShields):
        return torch.cat([all_latents(s) for s in source.sources])
    if hasattr(source, "latents"):
        return torch.cat([source.latents(list(range(s, min(s + RESAMPLE_CHUNK, len(source)))))
                          for s in range(0, len(source), RESAMPLE_CHUNK)]).float()
    raise ValueError(f"a {type(source).__name__} cannot list its shields")


class ExcludedShields:
    """A source minus some of its shields (given by value, exactly as the source returns them).

    Used to leave out the shield an img2img / inpaint input image itself lies in. ``within`` drops rows equal
    to an excluded shield; ``nearest`` reports the nearest remaining shield (index -1 when that is not the
    source's own nearest).
    """

    NEAREST_GROWTH_ROUNDS = 12

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

    def nearest(self, queries: torch.Tensor):
        dist, idx = self.source.nearest(queries)
        dist, idx = dist.clone(), idx.clone()
        for b in range(queries.shape[0]):
            reach = float(dist[b]) * (1 + 1e-6) + 1e-12
            if self._keep(self.source.within(queries[b:b + 1], reach)).shape[0] > 0:
                continue
            dist[b], idx[b] = math.inf, -1
            for _ in range(self.NEAREST_GROWTH_ROUNDS):
                reach *= 2
                found = self._keep(self.source.within(queries[b:b + 1], reach))
                if found.shape[0]:
                    d = (flatten(found).float() - flatten(queries[b:b + 1]).float().to(found.device)).norm(dim=1)
                    dist[b] = d.min().to(dist.device)
                    break
        return dist, idx
