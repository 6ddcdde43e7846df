"""One convention for the pack's ComfyUI hooks: the wrapper keys (ComfyUI's own enum), the active sigma window
(``guidance/window.py``, shared with the WebUI) and the model's signal scale. SPELL, DNG and particle guidance all
use these, and keep their per-run state the same way (``run_state.py``)."""
from __future__ import annotations

import torch

import comfy.patcher_extension

from ..guidance import window
from ..guidance.window import SigmaWindow

WRAPPERS = comfy.patcher_extension.WrappersMP


def check_percents(node: str, start_percent: float, end_percent: float) -> None:
    """The node's inputs ``start_percent``/``end_percent`` must satisfy ``0 <= start <= end <= 1``."""
    window.check_percents(f"{node}: inputs 'start_percent'/'end_percent'", start_percent, end_percent)


def sigma_window(model_sampling, start_percent: float, end_percent: float) -> SigmaWindow:
    """The active window of a ComfyUI model (its ``model_sampling.percent_to_sigma``)."""
    return SigmaWindow.of(model_sampling.percent_to_sigma, start_percent, end_percent)


def signal_scale(model_sampling, sigma: float) -> float:
    """``alpha`` in ``x = alpha x0 + sigma eps``: 1 for EPS/V models, ``1 - sigma`` for flow (CONST) models."""
    noise_scaling = getattr(model_sampling, "noise_scaling", None)
    if noise_scaling is None:        # a model sampling without it: plain VE
        return 1.0
    one = torch.ones(1, 1)
    return float(noise_scaling(torch.tensor([float(sigma)]), torch.zeros_like(one), one).flatten()[0])
