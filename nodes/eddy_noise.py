"""EDDY's correlated noise inside ComfyUI's samplers (the math is ``guidance/eddy.py``).

Stochastic k-diffusion samplers (euler_ancestral, dpmpp_2m_sde, dpmpp_sde, ...) take a ``noise_sampler(sigma,
sigma_next)`` returning unit noise shaped like the batch. For one sampler run the "Particle Guidance" node's
noise patch (``nodes/noise_patch.py``) hands them an ``EddyNoiseRun``: it draws iid unit noise from its own seeded
generator and applies ``guidance.eddy.exact_marginal_noise``: correlated across the batch by the kernel of the
batch's latest prediction (recorded by the noise patch's post-CFG function), or (``grid`` > 0) coupled with the
start coupling's design on that grid, blended by strength. Each image's noise stays exactly N(0, I) given
everything before it, so each image's chain is the unguided one.
"""
from __future__ import annotations

import inspect
import logging

import torch

from ..guidance.eddy import exact_marginal_noise

LOG = logging.getLogger("shielded_sampling")
SEED_OFFSET = 0x5EED  # keeps the injected noise stream apart from the starting noise ComfyUI draws from the seed
START_SEED_OFFSET = 0x57A7  # the independent half of a blended start
BLEND_SEED_OFFSET = 0xB1E0  # the independent half of blended fresh draws (drawn only when strength < 1)


def seeded_generator(seed, offset: int) -> torch.Generator:
    """A CPU generator seeded by ``seed + offset`` (runs are reproducible from the sampler's seed)."""
    return torch.Generator().manual_seed((int(seed or 0) + offset) % 2 ** 63)


def normal(shape, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """iid ``N(0, I)`` of ``shape``, drawn on the CPU (device-independent streams) and moved to ``device``."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)


def seeded_normal(like: torch.Tensor, seed, offset: int) -> torch.Tensor:
    """iid ``N(0, I)`` shaped like ``like`` from ``seeded_generator(seed, offset)``."""
    return normal(like.shape, seeded_generator(seed, offset), like.device, like.dtype)


def accepts_noise_sampler(sampler) -> bool:
    """Whether a ComfyUI sampler object calls a ``noise_sampler`` (only k-diffusion functions that take one)."""
    function = getattr(sampler, "sampler_function", None)
    options = getattr(sampler, "extra_options", None)
    if function is None or not isinstance(options, dict):
        return False
    try:
        return "noise_sampler" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


class EddyNoiseRun:
    """Per-run state of EDDY's noise: the raw-noise generator, the latest prediction and a draw count."""

    def __init__(self, like: torch.Tensor, seed, strength: float, embedding, bandwidth, window, grid=0):
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.generator = seeded_generator(seed, SEED_OFFSET)
        self.blend_generator = seeded_generator(seed, BLEND_SEED_OFFSET)
        self.strength, self.embedding, self.bandwidth = strength, embedding, bandwidth
        self.window = window            # a guidance.window.SigmaWindow
        self.grid = grid
        self.latest = None
        self.draws = self.correlated = 0

    def record(self, denoised: torch.Tensor):
        self.latest = denoised.detach()

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        return normal(self.shape, generator, self.device, self.dtype)

    def __call__(self, sigma, sigma_next=None) -> torch.Tensor:
        z = self.draw(self.generator)
        self.draws += 1
        s = float(torch.as_tensor(sigma).flatten()[0])
        if s not in self.window:
            return z
        if not self.grid and self.latest is None:
            return z
        embedded = None
        if not self.grid:
            with torch.no_grad():
                embedded = self.embedding(self.latest.float())
        self.correlated += 1
        return exact_marginal_noise(z, self.strength, self.grid, independent=lambda: self.draw(self.blend_generator),
                                    embedded=embedded, bandwidth=self.bandwidth)
