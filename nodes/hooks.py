"""One convention for the pack's ComfyUI hooks: the wrapper keys (ComfyUI's own enum), the active sigma window
and the model's signal scale. SPELL, DNG and particle guidance all use these."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import comfy.patcher_extension

WRAPPERS = comfy.patcher_extension.WrappersMP


def check_percents(node: str, start_percent: float, end_percent: float) -> None:
    """The inputs ``start_percent``/``end_percent`` must satisfy ``0 <= start <= end <= 1``."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"{node}: inputs 'start_percent'/'end_percent' must satisfy 0 <= start <= end <= 1 "
                         f"(got {start_percent}, {end_percent}); 0 and 1 act on every step")


@dataclass(frozen=True)
class SigmaWindow:
    """The noise levels ``end <= sigma <= start`` a guidance acts on (sigma falls as sampling proceeds)."""

    start: float = math.inf
    end: float = 0.0

    @classmethod
    def of(cls, model_sampling, start_percent: float, end_percent: float) -> "SigmaWindow":
        """The window of the model's own percent -> sigma map (0 = the first step, 1 = the last)."""
        return cls(float(model_sampling.percent_to_sigma(start_percent)),
                   float(model_sampling.percent_to_sigma(end_percent)))

    def __contains__(self, sigma: float) -> bool:
        return self.end <= sigma <= self.start


def signal_scale(model_sampling, sigma: float) -> float:
    """``alpha`` in ``x = alpha x0 + sigma eps``: 1 for EPS/V models, ``1 - sigma`` for flow (CONST) models."""
    noise_scaling = getattr(model_sampling, "noise_scaling", None)
    if noise_scaling is None:        # a model sampling without it: plain VE
        return 1.0
    one = torch.ones(1, 1)
    return float(noise_scaling(torch.tensor([float(sigma)]), torch.zeros_like(one), one).flatten()[0])
