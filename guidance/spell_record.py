"""SPELL run record: what the repellency did, per model evaluation and per output. Plain data, JSON-serialisable.

One type for every caller: ``guidance.sampling.SpellWrapper`` (the sampler API), the ComfyUI nodes and the WebUI
extension all fill a :class:`SpellReport`, and ``reporting.plots`` draws any of them (the paper's Fig. 5 and 7).
It lives in ``guidance/`` because the sampler API emits it and ``guidance/`` imports nothing above itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

# Relative float tolerance when telling "on the sphere" (the paper's guarantee) from "inside".
INSIDE_RTOL = 1e-4
# A final (t = 0) correction larger than this fraction of the latent's norm means the sampler did not follow
# the in-loop corrections: the protection then came from that last jump.
FINAL_JUMP_NOTE = 0.01
# Each output's nearest shield is searched within this many radii: indexed sets (a folder's database, PostgreSQL)
# answer "none within reach" beyond it instead of measuring most of a set of millions; in-memory sets are exact.
NEAREST_REACH_RADII = 2.0


@dataclass
class StepRecord:
    """One model evaluation (a sampler step, or a sub-step of a multi-evaluation sampler)."""

    step: int                       # index into the sigma schedule (the sampler API: evaluation of the run)
    sigma: float
    corrected: int                  # samples whose prediction was moved
    batch: int
    relative_size: list[float]      # per sample: ||lambda * Delta|| / ||x0_hat - x_t|| (paper Fig. 5a)
    nearest: list[float]            # per sample: distance to nearest known shield (inf = none within reach)
    rounds: int = 1
    active: list[bool] = field(default_factory=list)   # per sample: this prediction was moved (paper Fig. 5b)


def step_record(step: int, sigma: float, x0_hat: torch.Tensor, x_t: torch.Tensor, result) -> tuple[StepRecord,
                                                                                           torch.Tensor]:
    """One model evaluation's record and the mask of samples SPELL moved (``result`` None: nothing was active)."""
    b = x0_hat.shape[0]
    if result is None:
        return (StepRecord(step, sigma, 0, b, [0.0] * b, [math.inf] * b, rounds=0, active=[False] * b),
                torch.zeros(b, dtype=torch.bool))
    # At sigma = 0 (the final t = 0 step) x_t is the prediction itself: measure against its norm.
    ref = x0_hat if sigma == 0.0 else x0_hat - x_t
    step_norm = ref.flatten(1).float().norm(dim=1).clamp_min(1e-12)
    active = result.active.cpu()
    return StepRecord(step=step, sigma=sigma, corrected=int(active.sum()), batch=b,
                      relative_size=(result.delta.flatten(1).norm(dim=1) / step_norm).cpu().tolist(),
                      nearest=result.nearest_distance.cpu().tolist(), rounds=result.rounds,
                      active=active.tolist()), active


@dataclass
class OutputRecord:
    """One final latent of the run."""

    index: int
    nearest_shield: int             # index into the shield set (-1 = none / only batch peers or history)
    distance: float                 # raw L2 distance in the model's latent space
    repelled: bool                  # was this sample corrected at any step
    final_jump: float = 0.0         # ||t = 0 correction|| / ||latent||: 0 when the loop alone protected it

    @property
    def protected_by(self) -> str:
        """'final jump' when the t = 0 correction was large (see FINAL_JUMP_NOTE), else 'loop'."""
        return "final jump" if self.final_jump > FINAL_JUMP_NOTE else "loop"


@dataclass
class SpellReport:
    radius: float                   # raw L2 radius used (a radius schedule: the largest of the run)
    radius_rms: float               # the same in slider units (RMS per latent element)
    overcompensation: float
    elements: int                   # elements of one latent
    sigmas: list[float]
    steps: list[StepRecord] = field(default_factory=list)
    outputs: list[OutputRecord] = field(default_factory=list)
    shield_count: int = 0
    history_count: int = 0
    intra_batch: bool = False
    exact: bool = False
    shield_set_name: str = ""
    movable_fraction: list[float] = field(default_factory=list)  # inpainting: share of each latent the mask frees
    init_inside: int = 0            # shields the img2img / inpaint input itself lies in
    init_excluded: bool = False     # ... and they were left out of this run (init_image_shield = exclude it)

    def inside_limit(self) -> float:
        """Distances below this count as inside a shield (``INSIDE_RTOL`` absorbs the final check's rounding)."""
        return self.radius * (1 - INSIDE_RTOL)

    def outputs_inside(self) -> int:
        return sum(1 for o in self.outputs if o.distance < self.inside_limit())

    def nearest_reach(self) -> float:
        """How far each output's nearest shield is searched (raw L2); ``inf`` distances mean none within it."""
        return NEAREST_REACH_RADII * self.radius

    def nearest_text(self) -> str:
        """The nearest output-to-shield distance, or that none lies within the search's reach."""
        nearest = min((o.distance for o in self.outputs), default=math.inf)
        return f"nearest {nearest:.4g}" if math.isfinite(nearest) else self.no_nearest_text()

    def no_nearest_text(self) -> str:
        """What an infinite nearest distance means in this run."""
        if self.shield_count or self.history_count:
            return f"no shield within {NEAREST_REACH_RADII:g} r"
        return "no shield or history"

    def summary(self) -> str:
        corrected_steps = sum(1 for s in self.steps if s.corrected)
        inside = self.outputs_inside()
        repelled = sum(1 for o in self.outputs if o.repelled)
        text = (f"SPELL: r={self.radius_rms:.4g} rms ({self.radius:.4g} L2), {len(self.steps)} evals, "
                f"{corrected_steps} with corrections, {repelled}/{len(self.outputs)} outputs repelled, "
                f"{inside} inside a shield, {self.nearest_text()}")
        jumps = [o.final_jump for o in self.outputs]
        if jumps:
            by_jump = sum(1 for o in self.outputs if o.protected_by == "final jump")
            text += f"; final t=0 jump max {100 * max(jumps):.2g}% of the latent ({by_jump} protected by it)"
        if self.movable_fraction:
            text += f"; inpaint: mask frees {100 * min(self.movable_fraction):.3g}% of the latent"
        if self.init_inside:
            text += (f"; input image inside {self.init_inside} shield(s), "
                     f"{'excluded' if self.init_excluded else 'left'}")
        return text

    def active_matrix(self) -> torch.Tensor:
        """``[evaluations, B]`` bool: the prediction of sample ``b`` was moved at evaluation ``i`` (Fig. 5b)."""
        if not self.steps:
            return torch.zeros(0, 0, dtype=torch.bool)
        return torch.tensor([s.active for s in self.steps], dtype=torch.bool)

    def relative_matrix(self) -> torch.Tensor:
        """``[evaluations, B]`` relative correction sizes ``||lambda Delta|| / ||x0_hat - x_t||`` (Fig. 5a)."""
        if not self.steps:
            return torch.zeros(0, 0)
        return torch.tensor([s.relative_size for s in self.steps], dtype=torch.float32)

    def corrected_samples(self) -> torch.Tensor:
        """``[B]`` bool: SPELL moved this sample at least once (the paper's orange frames)."""
        m = self.active_matrix()
        return m.any(0) if m.numel() else torch.zeros(0, dtype=torch.bool)

    def to_dict(self) -> dict:
        return asdict(self)
