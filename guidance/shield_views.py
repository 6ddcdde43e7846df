"""Views of a shield source that SPELL searches as one: through a scalar affine map (the model's latent space),
several sources together (a protected set plus the run's history), and a source minus some shields (an img2img
input's own). Each implements :class:`guidance.shields.ShieldSource` by asking the sources it wraps.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .shields import ShieldSource, TensorShields, flatten, resampled_source


def model_space(source: ShieldSource, process_in: Callable, affine: tuple[float, float] | None) -> ShieldSource:
    """``source`` (LATENT space) as the model sees it: a view through ``affine = (scale, shift)`` when
    ``process_in(x) == scale * (x - shift)``, else ``source.mapped(process_in)``."""
    return source.mapped(process_in) if affine is None else AffineShields(source, *affine)


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
