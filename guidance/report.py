"""SPELL run report: what the repellency did, per step and per output. Plain data, JSON-serialisable."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


# Relative float tolerance when telling "on the sphere" (the paper's guarantee) from "inside".
INSIDE_RTOL = 1e-4


@dataclass
class StepRecord:
    """One model evaluation (a sampler step, or a sub-step of a multi-evaluation sampler)."""

    step: int                       # index into the sigma schedule
    sigma: float
    corrected: int                  # samples whose prediction was moved
    batch: int
    relative_size: list[float]      # per sample: ||lambda * Delta|| / ||x0_hat - x_t||
    nearest: list[float]            # per sample: distance to nearest known shield (inf = none within reach)
    rounds: int = 1


@dataclass
class OutputRecord:
    """One final latent of the run."""

    index: int
    nearest_shield: int             # index into the shield set (-1 = none / only batch peers)
    distance: float                 # raw L2 distance in the model's latent space
    repelled: bool                  # was this sample corrected at any step


@dataclass
class SpellReport:
    radius: float                   # raw L2 radius used
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

    def summary(self) -> str:
        corrected_steps = sum(1 for s in self.steps if s.corrected)
        inside = sum(1 for o in self.outputs if o.distance < self.radius * (1 - INSIDE_RTOL))
        repelled = sum(1 for o in self.outputs if o.repelled)
        nearest = min((o.distance for o in self.outputs), default=math.inf)
        return (f"SPELL: r={self.radius_rms:.4g} rms ({self.radius:.4g} L2), {len(self.steps)} evals, "
                f"{corrected_steps} with corrections, {repelled}/{len(self.outputs)} outputs repelled, "
                f"{inside} inside a shield, nearest {nearest:.4g}")

    def to_dict(self) -> dict:
        return asdict(self)
