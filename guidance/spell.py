"""SPELL: sparse repellency of the denoised prediction out of balls around shields.

Kirchhof et al., "Shielded Diffusion: Generating Novel and Diverse Images using Sparse Repellency",
ICML 2025. Notation of the paper: prediction ``x0_hat = D(x_t, sigma)``, shields ``z_k``, radius ``r``,
overcompensation ``lambda``.

Eq. 5:  ``Delta = sum_k relu(r / ||x0_hat - z_k|| - 1) (x0_hat - z_k)``,  ``x0_hat' = x0_hat + lambda Delta``.
Eq. 7:  intra-batch, the shields of sample ``i`` are the predictions ``x0_hat_j`` of the others (``j != i``).

Numerics. Each term is evaluated as ``(r - d_k) u_k`` with ``u_k`` the unit vector of ``x0_hat - z_k``
computed from explicit differences after scaling by the largest component, never from the expansion
``||a||^2 + ||b||^2 - 2ab`` (which cancels to 0 or a negative number for a prediction sitting on a
large-norm shield, the case of a model reproducing a protected image). When ``x0_hat == z_k`` exactly the
direction is undefined (the paper's term is ``0 * inf``); we then push along a fixed pseudo-random unit
vector drawn from a generator seeded by the sample's index in the batch, so the result is
deterministic and two identical samples of a batch are pushed apart.

Exact mode. With overlapping shields eq. 5 can cancel (a prediction midway between two centres gets no
push). ``exact=True`` follows eq. 5 with further rounds: while the prediction is inside some shield it is
moved along the (summed) repulsive direction, or away from the centroid of the containing shields when
the sum cancels, by the smallest step that leaves every containing ball (balls are convex, so the ray
leaves each for good); newly entered shields are found by asking the source again. Bounded rounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernels import diff_block_rows
from .shields import TensorShields, flatten

# Relative margin by which exact mode clears a shield, so float rounding cannot leave it on the sphere.
EXACT_MARGIN = 1e-4
MAX_EXACT_MARGIN = 1e-2
MAX_EXACT_ROUNDS = 64
TIE_SEED = 0x5BE11


@dataclass
class SpellResult:
    """Outcome of one SPELL correction; per-sample fields are ``[B]`` tensors."""

    denoised: torch.Tensor          # corrected prediction, same shape/dtype/device as the input
    delta: torch.Tensor             # denoised - x0_hat, float32
    active: torch.Tensor            # bool: a correction was applied
    shields_hit: torch.Tensor       # int64: shields (incl. other batch samples) containing x0_hat
    nearest_distance: torch.Tensor  # float32: x0_hat to the nearest batch peer or source shield within 2r, inf if none
    final_distance: torch.Tensor    # float32: the same distance measured from the corrected result
    inside: torch.Tensor            # bool: the result is still strictly inside a known shield
    rounds: int                     # correction rounds applied (1 unless exact=True)


def tie_directions(batch: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random unit vectors, one per batch index, for predictions sitting on a centre."""
    gen = torch.Generator(device="cpu").manual_seed(TIE_SEED)
    dirs = torch.randn(batch, dim, generator=gen, dtype=torch.float32)
    return (dirs / dirs.norm(dim=1, keepdim=True)).to(device)


def stable_norm_and_unit(diff: torch.Tensor):
    """``(||diff||, diff / ||diff||)`` over the last dim without underflow/overflow; unit is 0 where diff is 0."""
    scale = diff.abs().amax(-1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = diff / safe
    scaled_norm = scaled.norm(dim=-1, keepdim=True)
    unit = scaled / torch.where(scaled_norm > 0, scaled_norm, torch.ones_like(scaled_norm))
    return (scale * scaled_norm).squeeze(-1), unit


def repellency_terms(x: torch.Tensor, centres: torch.Tensor, radius: float, ties: torch.Tensor,
                     exclude_self: bool = False, movable: torch.Tensor | None = None):
    """Eq. 5 for every sample of ``x [B, D]`` against ``centres [M, D]`` (all float32), chunked over M.

    Returns ``(Delta [B, D], hits [B], nearest [B], unit sum of containing centres [B, D], count)``;
    with ``exclude_self`` the centres are the batch itself and the diagonal is skipped (eq. 7).
    ``movable [B, D]`` (bool, optional) restricts the push to those elements (an inpainting mask): see
    :func:`masked_terms`.
    """
    b, d = x.shape
    delta = torch.zeros_like(x)
    centroid = torch.zeros_like(x)
    hits = torch.zeros(b, dtype=torch.long, device=x.device)
    nearest = torch.full((b,), math.inf, device=x.device)
    step = diff_block_rows(b, d)
    for start in range(0, centres.shape[0], step):
        z = centres[start:start + step]
        diff = x[:, None, :] - z[None, :, :]
        if movable is None:
            dist, unit = stable_norm_and_unit(diff)
            full, reach = dist, radius
        else:
            full, dist, unit, reach = masked_terms(diff, movable[:, None, :], radius)
        unit = torch.where(dist[..., None] > 0, unit, ties[:, None, :])
        inside = full < radius
        if exclude_self:
            own = torch.arange(start, start + z.shape[0], device=x.device)
            is_self = own[None, :] == torch.arange(b, device=x.device)[:, None]
            inside &= ~is_self
            full = full.masked_fill(is_self, math.inf)
        weight = torch.where(inside, reach - dist, torch.zeros_like(dist))
        delta += (weight[..., None] * unit).sum(1)
        centroid += (inside[..., None] * z[None, :, :]).sum(1)
        hits += inside.sum(1)
        nearest = torch.minimum(nearest, full.min(1).values)
    return delta, hits, nearest, centroid


def masked_terms(diff: torch.Tensor, movable: torch.Tensor, radius: float):
    """Eq. 5 restricted to the elements an inpainting mask lets move.

    With ``f = ||diff|| over the fixed elements`` the ball ``||diff|| < r`` is left exactly when the movable
    part reaches ``sqrt(r^2 - f^2)``: the paper's term with that per-pair radius, in the movable subspace.
    Returns ``(full distance, movable distance, movable unit vector, per-pair radius)``.
    """
    full, _ = stable_norm_and_unit(diff)
    fixed, _ = stable_norm_and_unit(torch.where(movable, torch.zeros_like(diff), diff))
    dist, unit = stable_norm_and_unit(torch.where(movable, diff, torch.zeros_like(diff)))
    reach = (radius * radius - fixed.square()).clamp_min(0).sqrt()
    return full, dist, unit, reach


def exit_step(x: torch.Tensor, direction: torch.Tensor, centres: torch.Tensor, radius: float) -> torch.Tensor:
    """Smallest ``t >= 0`` with ``||x + t u - z|| >= radius`` for every centre ``z [M, D]`` (x, u: ``[D]``)."""
    rel = x[None, :] - centres
    b = rel @ direction
    c = rel.square().sum(-1) - radius * radius
    disc = (b * b - c).clamp_min(0).sqrt()
    # Larger root of t^2 + 2bt + c = 0, written without cancellation.
    t = torch.where(b > 0, -c / (b + disc).clamp_min(1e-30), disc - b)
    return t.clamp_min(0).max() if t.numel() else x.new_zeros(())


@dataclass
class _Shieldsets:
    """What a sample is repelled from: a source (tensor/index) and optionally the rest of the batch."""

    source: object
    intra_batch: bool
    movable: torch.Tensor | None = None   # [B, D] bool: elements the push may change (None = all)

    def centres_for(self, x: torch.Tensor, reach: float) -> torch.Tensor:
        """Every source shield within ``reach`` of some row of ``x`` (flat float32)."""
        if self.source is None or len(self.source) == 0:
            return x.new_zeros(0, x.shape[1])
        found = self.source.within(x.reshape(x.shape[0], *self.source.item_shape), reach)
        return found.reshape(found.shape[0], x.shape[1]).float().to(x.device)


def correction(x: torch.Tensor, centres: torch.Tensor, intra_batch: bool, radius: float, ties: torch.Tensor,
               movable: torch.Tensor | None = None):
    """Eq. 5 (``centres``) + eq. 7 (other rows of ``x``) summed: ``(Delta, hits, nearest, centroid sum)``."""
    delta, hits, nearest, centroid = repellency_terms(x, centres, radius, ties, movable=movable)
    if intra_batch and x.shape[0] > 1:
        d2, h2, n2, c2 = repellency_terms(x, x, radius, ties, exclude_self=True, movable=movable)
        delta, hits, nearest, centroid = delta + d2, hits + h2, torch.minimum(nearest, n2), centroid + c2
    return delta, hits, nearest, centroid


def exact_round(x: torch.Tensor, sets: _Shieldsets, radius: float, ties: torch.Tensor,
                target: float | None = None) -> torch.Tensor:
    """One exact-mode round: move every sample still inside a shield out of all shields containing it."""
    target = radius * (1 + EXACT_MARGIN) if target is None else target
    centres = sets.centres_for(x, radius)
    delta, hits, _, centroid = correction(x, centres, sets.intra_batch, radius, ties, sets.movable)
    moved = x.clone()
    for i in hits.nonzero().flatten().tolist():
        containing = _containing_centres(x, i, centres, sets.intra_batch, radius)
        movable_i = None if sets.movable is None else sets.movable[i]
        direction = _escape_direction(x[i], delta[i], centroid[i] / hits[i], ties[i], movable_i)
        moved[i] = x[i] + exit_step(x[i], direction, containing, target) * direction
    return moved


def _containing_centres(x: torch.Tensor, i: int, centres: torch.Tensor, intra_batch: bool, radius: float):
    if intra_batch:
        centres = torch.cat([centres, x[:i], x[i + 1:]])
    dist, _ = stable_norm_and_unit(x[i][None, :] - centres)
    return centres[dist < radius]


def _escape_direction(xi, delta_i, centroid_i, tie_i, movable_i=None) -> torch.Tensor:
    """Summed repulsion if it has not cancelled, else away from the containing centres' mean, else the tie."""
    for candidate in (delta_i, xi - centroid_i):
        if movable_i is not None:
            candidate = torch.where(movable_i, candidate, torch.zeros_like(candidate))
        norm, unit = stable_norm_and_unit(candidate[None, :])
        if norm.item() > 0 and torch.isfinite(norm).item():
            return unit[0]
    return tie_i


def _validated(x0_hat: torch.Tensor, radius: float, overcompensation: float, shields):
    if x0_hat.dim() < 2:
        raise ValueError(f"x0_hat must be a batch [B, ...], got shape {tuple(x0_hat.shape)}")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
    if not (math.isfinite(overcompensation) and overcompensation > 0):
        raise ValueError(f"overcompensation must be a finite number > 0, got {overcompensation!r}")
    if isinstance(shields, torch.Tensor):
        shields = TensorShields(shields)
    if shields is not None and len(shields) > 0 and tuple(shields.item_shape) != tuple(x0_hat.shape[1:]):
        raise ValueError(f"shield shape {tuple(shields.item_shape)} does not match prediction shape "
                         f"{tuple(x0_hat.shape[1:])}")
    return shields


def sparse_repellency(x0_hat: torch.Tensor, radius: float, shields=None, intra_batch: bool = False,
                      overcompensation: float = 1.0, exact: bool = False,
                      max_rounds: int = MAX_EXACT_ROUNDS, movable: torch.Tensor | None = None) -> SpellResult:
    """SPELL correction of ``x0_hat [B, ...]`` (eq. 5 with ``shields``, eq. 7 with ``intra_batch``, or both).

    ``shields``: ``None``, a tensor ``[K, ...]`` or a shield source (see ``guidance.shields``).
    ``radius`` is the raw L2 radius. Distances are computed in float32; the result has the input dtype.
    ``movable`` (bool, shape of ``x0_hat``): only these elements may change (inpainting: the masked region);
    distances still count every element. A row with nothing movable cannot be moved and stays ``inside``.
    """
    shields = _validated(x0_hat, float(radius), float(overcompensation), shields)
    radius = float(radius)
    x = flatten(x0_hat).float()
    movable = _validated_movable(movable, x0_hat)
    sets = _Shieldsets(shields, bool(intra_batch), movable)
    ties = tie_directions(x.shape[0], x.shape[1], x.device)
    if movable is not None:
        ties = masked_ties(ties, movable)
    # One search with a 2r reach gives the terms (only d < r counts) and nearby distances for the report.
    centres = sets.centres_for(x, 2 * radius)
    delta, hits, nearest, _ = correction(x, centres, sets.intra_batch, radius, ties, movable)
    corrected = x + overcompensation * delta
    active = (corrected != x).any(1)
    final = nearest
    if active.any():
        # A shield within r of a result moved by <= r lies within 2r of x0_hat: the first search covers it.
        moved_at_most_r = (corrected - x).norm(dim=1).max().item() <= radius
        reuse = centres if moved_at_most_r else sets.centres_for(corrected, 2 * radius)
        _, _, final, _ = correction(corrected, reuse, sets.intra_batch, radius, ties, movable)
    rounds = 1
    if exact:
        corrected, final, rounds = _exact_rounds(corrected, final, sets, radius, ties, max_rounds, x0_hat.dtype)
    return SpellResult(
        denoised=corrected.reshape(x0_hat.shape).to(x0_hat.dtype),
        delta=(corrected - x).reshape(x0_hat.shape),
        active=(corrected != x).any(1),
        shields_hit=hits,
        nearest_distance=nearest,
        final_distance=final,
        inside=final < radius,
        rounds=rounds,
    )


def _validated_movable(movable, x0_hat: torch.Tensor) -> torch.Tensor | None:
    if movable is None:
        return None
    if tuple(movable.shape) != tuple(x0_hat.shape):
        raise ValueError(f"movable must have the prediction's shape {tuple(x0_hat.shape)}, got {tuple(movable.shape)}")
    return flatten(movable.to(device=x0_hat.device, dtype=torch.bool))


def masked_ties(ties: torch.Tensor, movable: torch.Tensor) -> torch.Tensor:
    """Tie directions restricted to each row's movable elements (zero for a row with none)."""
    _, unit = stable_norm_and_unit(torch.where(movable, ties, torch.zeros_like(ties)))
    return unit


# Inpainting-mask values at or below this count as kept: moving them would need a push of delta / m.
MOVABLE_MASK = 1e-3


def inpaint_blend(x0_hat: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """What an inpainting sampler keeps of a prediction: ``x0_hat * m + kept * (1 - m)`` (ComfyUI's order)."""
    return x0_hat * mask + kept * (1. - mask)


def unblended_prediction(x0_hat: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor,
                         movable: torch.Tensor) -> torch.Tensor:
    """The prediction whose blend moves by ``delta``: ``x0_hat + delta / m`` where movable, ``x0_hat`` elsewhere."""
    step = torch.where(movable, delta.to(x0_hat.dtype) / torch.where(movable, mask, torch.ones_like(mask)),
                       torch.zeros_like(x0_hat))
    return x0_hat + step


def _exact_rounds(x, final, sets, radius, ties, max_rounds, dtype):
    """Rounds until nothing is inside, judged on the result as it will be returned (cast to ``dtype``).

    Two float32 evaluations of the same distance can differ in the last bit, so exact mode asks for a
    clearance: a result closer than ``r (1 + EXACT_MARGIN / 2)`` to a shield counts as inside and is
    moved to ``r (1 + margin)``. If float rounding (of ``x + t u`` at large coordinates, or of the cast to
    fp16/bf16) still leaves it short, the margin grows fourfold per round, up to ``MAX_EXACT_MARGIN``.
    """
    clearance = radius * (1 + EXACT_MARGIN / 2)
    rounds, margin = 1, EXACT_MARGIN
    while rounds < max_rounds:
        returned = x.to(dtype).float()
        final = _nearest_known(returned, sets, clearance, ties)
        if not (final < clearance).any():
            return returned, final, rounds
        slack = (returned - x).norm(dim=1).max().item()
        x = exact_round(returned, sets, clearance, ties, radius * (1 + margin) + 2 * slack)
        margin = min(margin * 4, MAX_EXACT_MARGIN)
        rounds += 1
    return x, _nearest_known(x.to(dtype).float(), sets, radius, ties), rounds


def _nearest_known(x, sets, radius, ties) -> torch.Tensor:
    """Distance to the nearest batch peer (intra-batch) or source shield within 2r; inf if none."""
    _, _, nearest, _ = correction(x, sets.centres_for(x, 2 * radius), sets.intra_batch, radius, ties,
                                  sets.movable)
    return nearest
