"""Settings of the "Particle Guidance" node: modes, spaces, the start coupling grid, and their validation."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .hooks import check_percents

NODE = "Particle Guidance"
PG, EDDY, EDDY_DRIFT = "particle guidance", "EDDY", "EDDY drift (paper form)"
MODES = (PG, EDDY, EDDY_DRIFT)
SPACES = {"latent": "latent", "pooled NxN": "pooled", "colour": "colour", "edges": "edges"}
EDDY_PROBES = 1
COUPLINGS = {"auto": None, "independent": 0, "spread 1x1 (channel means)": 1, "spread 2x2": 2, "spread 4x4": 4,
             "spread 8x8": 8}
AUTO = -1           # "auto" in EDDY mode: resolved per latent by ``auto_grid``
AUTO_COORDINATES = 16  # coupled numbers per image that "auto" asks for (terrain chain: 16 spread it, 4 barely)


@dataclass
class ParticleSettings:
    mode: str
    strength: float
    space: str
    pool_size: int
    bandwidth: float
    start_percent: float
    end_percent: float
    start_coupling: str = "auto"

    def grid(self) -> int:
        """The coupling grid: 0 = independent, ``AUTO`` = "auto" in EDDY mode (resolved per latent), else G."""
        value = COUPLINGS.get(self.start_coupling, 0)
        return (AUTO if self.mode == EDDY else 0) if value is None else value

    def validate(self):
        def fail(inp, msg):
            raise ValueError(f"{NODE}: input '{inp}' {msg}")
        if self.mode not in MODES:
            fail("mode", f"must be one of {MODES}, got {self.mode!r}")
        if self.space not in SPACES:
            fail("space", f"must be one of {tuple(SPACES)}, got {self.space!r}")
        if not math.isfinite(self.strength):
            fail("strength", f"must be a finite number, got {self.strength}")
        if not (math.isfinite(self.bandwidth) and self.bandwidth >= 0):
            fail("bandwidth", f"must be >= 0 (0 = median rule), got {self.bandwidth}")
        if self.pool_size < 1:
            fail("pool_size", f"must be >= 1, got {self.pool_size}; 8 is a good start")
        check_percents(NODE, self.start_percent, self.end_percent)
        if self.start_coupling not in COUPLINGS:
            fail("start_coupling", f"must be one of {tuple(COUPLINGS)}, got {self.start_coupling!r}")
        if self.mode == EDDY and not -1.0 <= self.strength <= 1.0:
            fail("strength", f"must lie in [-1, 1] in EDDY mode (the noise correlation; 1 = most spread), got "
                 f"{self.strength}")
        if self.mode == EDDY and self.grid() and self.strength < 0:
            fail("strength", f"must lie in [0, 1] in EDDY mode with a spread design (start_coupling "
                 f"{self.start_coupling!r}), got {self.strength}; negative strengths (a more alike batch) need "
                 f"start_coupling 'independent'")
        if self.mode == EDDY_DRIFT and self.grid():
            fail("start_coupling", f"must be 'independent' with mode '{EDDY_DRIFT}': the drift keeps each image's "
                 f"distribution only for independent starting noises (with a coupled start it shifts it); use "
                 f"mode 'EDDY' for exact spread")

    def latent_grid(self, noise: torch.Tensor) -> int:
        """The grid for this latent: "auto" falls back to 0 (the kernel correlation) for non-image latents."""
        if self.grid() == AUTO and noise.dim() not in (4, 5):
            return 0
        return self.grid() and self.clamped_grid(noise)

    def clamped_grid(self, noise: torch.Tensor) -> int:
        """The chosen (or "auto") grid, no finer than the latent; refuses latents that are not images/video."""
        if noise.dim() not in (4, 5):
            raise ValueError(f"{NODE}: input 'start_coupling' needs image or video latents ([N, C, H, W] or "
                             f"[N, C, T, H, W]) but this sampler's noise has shape {tuple(noise.shape)}; set "
                             f"start_coupling to 'independent' for this model")
        grid = auto_grid(noise.shape[1]) if self.grid() == AUTO else self.grid()
        return min(grid, noise.shape[-2], noise.shape[-1])

    def check_latent(self, noise: torch.Tensor):
        """Refuse, before the first step, a latent the chosen space cannot embed (only 'latent' takes any rank)."""
        if noise.shape[0] < 2 or self.strength == 0 or SPACES[self.space] == "latent" or noise.dim() in (4, 5):
            return
        if self.mode == EDDY and self.grid() > 0:
            return      # a spread design embeds nothing; start_coupling's own check names that input
        raise ValueError(f"{NODE}: input 'space' is {self.space!r}, which needs image or video latents ([N, C, H, "
                         f"W] or [N, C, T, H, W]), but this model samples latents of shape {tuple(noise.shape)}; "
                         f"set space to 'latent' for this model")


def auto_grid(channels: int) -> int:
    """The coarsest grid with at least ``AUTO_COORDINATES`` coupled numbers per image: 2x2 for 4-channel latents
    (SD1.5/SDXL), 4x4 for 1-channel, 1x1 for 16-channel (SD3, Flux)."""
    return next((g for g in (1, 2, 4, 8) if channels * g * g >= AUTO_COORDINATES), 8)
