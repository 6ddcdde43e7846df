"""Start coupling and EDDY inside ComfyUI's sampler: the batch's noise replaced by exact-marginal coupled noise.

A ``SAMPLER_SAMPLE`` wrapper runs once per sampler run. It replaces the unit starting noise (before the sampler
scales it by sigma_max) by coupled noise (``guidance/coupling.py``; in EDDY mode ``guidance.eddy.
exact_marginal_noise``) and, in EDDY mode, hands samplers that take a ``noise_sampler`` an ``EddyNoiseRun``
(``nodes/eddy_noise.py``) for that run only, restoring the sampler's options afterwards. In EDDY mode without a
spread grid, a post-CFG function records the batch's latest prediction, whose kernel correlates the fresh draws.
Every image keeps exactly the noise law it has without the node.
"""
from __future__ import annotations

import logging

import torch

from ..guidance.coupling import couple_noise, design
from ..guidance.eddy import exact_marginal_noise
from ..guidance.embeddings import make_embedding
from .eddy_noise import START_SEED_OFFSET, EddyNoiseRun, accepts_noise_sampler, seeded_normal
from .hooks import WRAPPERS, sigma_window
from .particle_settings import EDDY, NODE, SPACES, ParticleSettings
from .run_state import find_run_state, keep_run_state, state_key

LOG = logging.getLogger("shielded_sampling")


class NoisePatch:
    """The sampler wrapper (and, for EDDY, the prediction recorder); holds the settings. A run's ``EddyNoiseRun``
    lives in that run's model_options (``run_state.py``) and, as its noise sampler, in the sampler's options."""

    def __init__(self, settings: ParticleSettings, model_sampling):
        self.settings = settings
        self.embedding = make_embedding(SPACES[settings.space], settings.pool_size)
        self.window = sigma_window(model_sampling, settings.start_percent, settings.end_percent)
        self.key = state_key("particle_noise", self)

    def __deepcopy__(self, memo):
        """Shared by every clone (ComfyUI 0.3.x deep-copies model_options); it holds no run state."""
        return self

    def __call__(self, args):
        """Post-CFG (EDDY only): record the prediction whose kernel correlates the next fresh draw."""
        run = find_run_state(args["model_options"], self.key)
        if run is not None:
            run.record(args["denoised"])
        return args["denoised"]

    def sampler_wrapper(self, executor, *args, **kwargs):
        """Runs once per sampler run (``args`` = guider, sigmas, extra_args, callback, noise, ...): the sampler
        gets the coupled starting noise and, in EDDY mode, EDDY's noise sampler for this run only."""
        args = list(args)
        extra_args = args[2] if len(args) > 2 else kwargs.get("extra_args", {})
        seed = extra_args.get("seed")
        self.settings.check_latent(args[4] if len(args) > 4 else kwargs["noise"])
        if len(args) > 4:
            noise = args[4] = self.start_noise(args[4], seed)
        else:
            noise = kwargs["noise"] = self.start_noise(kwargs["noise"], seed)
        sampler = executor.class_obj
        run = self.start_noise_run(sampler, noise, seed)
        if run is None:
            return executor(*args, **kwargs)
        options = sampler.extra_options
        sampler.extra_options = {**options, "noise_sampler": run}
        try:
            with keep_run_state(extra_args["model_options"], self.key, run):
                return executor(*args, **kwargs)
        finally:
            sampler.extra_options = options
            LOG.info("%s: EDDY correlated %d of the sampler's %d noise draws (the others were outside the "
                     "window)", NODE, run.correlated, run.draws)

    def start_noise_run(self, sampler, noise, seed):
        """EDDY's per-run noise state, or None (other modes, batch 1, strength 0, or a sampler without one)."""
        s = self.settings
        if s.mode != EDDY or noise.shape[0] < 2 or s.strength == 0:
            return None
        if not accepts_noise_sampler(sampler) or "noise_sampler" in sampler.extra_options:
            LOG.info("%s: EDDY: this sampler adds no fresh noise after the start (or brings its own noise "
                     "sampler), so only the starting noise is coupled; ancestral/SDE samplers get more spread",
                     NODE)
            return None
        return EddyNoiseRun(noise, seed, s.strength, self.embedding, s.bandwidth or None, self.window,
                            s.latent_grid(noise))

    def start_noise(self, noise: torch.Tensor, seed) -> torch.Tensor:
        """The starting noise: EDDY's, the start coupling design alone (other modes), or unchanged. A zero noise
        (noise disabled: KSamplerAdvanced add_noise 'disable', a two-pass workflow's second stage, DisableNoise)
        stays zero."""
        s = self.settings
        if not bool(noise.any()):
            if noise.shape[0] > 1 and (s.grid() or (s.mode == EDDY and s.strength != 0)):
                LOG.info("%s: the sampler's starting noise is zero (noise disabled, e.g. a second sampling stage): "
                         "left at zero, nothing to couple", NODE)
            return noise
        if noise.shape[0] < 2:
            LOG.info("%s: start coupling: batch size 1, the noise is left as it is", NODE)
            return noise
        if s.mode != EDDY:
            return self.couple(noise) if s.grid() else noise
        if s.strength == 0:
            return noise
        grid = s.latent_grid(noise)
        if not grid:
            LOG.info("%s: EDDY: starting noises correlated across the batch of %d (strength %g); every image "
                     "keeps an exact N(0, I) noise", NODE, noise.shape[0], s.strength)
        elif s.strength < 1:
            LOG.info("%s: EDDY strength %g blends the spread design with independent noise; on a real model "
                     "the spread fell off quickly below 1 (BENCHMARKS.md), so 1 is recommended", NODE, s.strength)
        if grid:
            self.log_design(noise, grid)
        return exact_marginal_noise(noise, s.strength, grid,
                                    independent=lambda: seeded_normal(noise, seed, START_SEED_OFFSET))

    def couple(self, noise: torch.Tensor) -> torch.Tensor:
        grid = self.settings.clamped_grid(noise)
        self.log_design(noise, grid)
        return couple_noise(noise, grid)

    @staticmethod
    def log_design(noise: torch.Tensor, grid: int):
        m = noise.shape[1] * grid * grid
        _, kind = design(noise.shape[0], m)
        LOG.info("%s: start noise coupled on a %dx%d grid (%d coordinates per image, %s, batch %d): every image "
                 "keeps an exact N(0, I) starting noise, the batch is spread in those coordinates",
                 NODE, grid, grid, m, kind, noise.shape[0])

    def apply(self, model):
        patched = model.clone()
        if self.settings.mode == EDDY and self.settings.strength != 0:
            patched.set_model_sampler_post_cfg_function(self)
        patched.add_wrapper_with_key(WRAPPERS.SAMPLER_SAMPLE, self.key, self.sampler_wrapper)
        return patched
