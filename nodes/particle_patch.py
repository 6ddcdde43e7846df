"""Particle guidance and EDDY drift inside ComfyUI's sampler: a post-CFG edit of the batch's prediction.

The function edits the CFG-combined prediction ``denoised`` of the whole batch (k-diffusion convention,
``x = alpha x0 + sigma eps``; ``alpha = 1`` except for flow models):

- particle guidance: ``D' = D + strength * sigma * eta * J^T phi`` (``guidance/particle.py``), on ``D``;
- EDDY drift (paper form): ``D' = D + sigma * strength * v`` with ``v = eddy_drift(x, (alpha D - x) / sigma^2)``
  computed on the noisy batch ``x`` (``guidance/eddy_drift.py``); an Euler step then moves ``x`` by
  ``strength * v * (sigma - sigma_next)``. Exact only from independent starts, where it cannot change the batch's
  joint law.
"""
from __future__ import annotations

import logging
import zlib

import torch

from ..guidance.eddy_drift import eddy_drift
from ..guidance.embeddings import make_embedding
from ..guidance.particle import particle_guidance
from .hooks import WRAPPERS, sigma_window, signal_scale
from .particle_settings import EDDY_PROBES, NODE, PG, SPACES, ParticleSettings
from .run_state import state_key

LOG = logging.getLogger("shielded_sampling")


class PredictionPatch:
    """The post-CFG function of particle guidance / EDDY drift; holds the settings and a once-per-patch log flag."""

    def __init__(self, settings: ParticleSettings, model_sampling):
        self.settings = settings
        self.model_sampling = model_sampling
        self.embedding = make_embedding(SPACES[settings.space], settings.pool_size)
        self.window = sigma_window(model_sampling, settings.start_percent, settings.end_percent)
        self.logged_single = False
        self.key = state_key("particle", self)

    def __deepcopy__(self, memo):
        """Shared by every clone (ComfyUI 0.3.x deep-copies model_options): one patch and one log flag."""
        return self

    def __call__(self, args):
        denoised = args["denoised"]
        if denoised.shape[0] < 2:
            if not self.logged_single:
                LOG.info("%s: batch size 1, nothing to repel from; the model runs unchanged", NODE)
                self.logged_single = True
            return denoised
        sigma = float(args["sigma"].flatten()[0])
        if sigma not in self.window or sigma <= 0:
            return denoised
        return denoised + self.correction(denoised, args["input"], sigma).to(denoised.dtype)

    def correction(self, denoised, x, sigma):
        s = self.settings
        bandwidth = s.bandwidth or None
        if s.mode == PG:
            return particle_guidance(denoised, s.strength, self.embedding, bandwidth, sigma=sigma).delta
        alpha = signal_scale(self.model_sampling, sigma)
        score = (alpha * denoised.float() - x.float()) / sigma ** 2
        # Hutchinson draws (edges only) are seeded by the noise level: reruns are reproducible.
        gen = torch.Generator().manual_seed(zlib.crc32(repr(round(sigma, 6)).encode()))
        v = eddy_drift(x, score, self.embedding, bandwidth, probes=EDDY_PROBES, generator=gen)
        return sigma * s.strength * v.float()

    def sampler_wrapper(self, executor, *args, **kwargs):
        """Once per sampler run (``args`` = guider, sigmas, extra_args, callback, noise, ...): refuses, before
        the first step, a latent the chosen space cannot embed."""
        self.settings.check_latent(args[4] if len(args) > 4 else kwargs["noise"])
        return executor(*args, **kwargs)

    def apply(self, model, check_latent: bool = True):
        """The patched clone; ``check_latent`` False when another wrapper of the node already checks it."""
        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(self)
        if check_latent:
            patched.add_wrapper_with_key(WRAPPERS.SAMPLER_SAMPLE, self.key, self.sampler_wrapper)
        return patched
