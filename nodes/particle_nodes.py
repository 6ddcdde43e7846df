""""Particle Guidance" node: batch repulsion (Corso et al.) or its divergence-free form (EDDY) as a MODEL patch.

Pure math lives in ``guidance/particle.py``, ``guidance/eddy.py`` and ``guidance/embeddings.py``; this module
is the post-CFG hook and the thin node. The hook edits the CFG-combined prediction ``denoised`` of the whole
batch (k-diffusion convention, ``x = alpha x0 + sigma eps``; ``alpha = 1`` except for flow models):

- particle guidance: ``D' = D + strength * sigma * eta * J^T phi`` (see ``guidance.particle``), on ``D``;
- EDDY: ``D' = D + sigma * strength * v`` with ``v = eddy_drift(x, (alpha D - x) / sigma^2)`` computed on the
  noisy batch ``x``; an Euler step then moves ``x`` by ``strength * v * (sigma - sigma_next)``.

Start coupling (``guidance/coupling.py``) is a ``SAMPLER_SAMPLE`` wrapper: once per sampler run it replaces the
unit starting noise (before the sampler scales it by sigma_max) by the exact-marginal coupled noise, then calls
the sampler. It works alone (strength 0) or with either mode.
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass

import torch

from ..guidance.coupling import couple_noise, design
from ..guidance.eddy import eddy_drift
from ..guidance.embeddings import make_embedding
from ..guidance.particle import particle_guidance

LOG = logging.getLogger("shielded_sampling")
CATEGORY = "sampling/shielded"
NODE = "Particle Guidance"
MODES = ("particle guidance", "EDDY")
SPACES = {"latent": "latent", "pooled NxN": "pooled", "colour": "colour", "edges": "edges"}
EDDY_PROBES = 1
COUPLINGS = {"independent": 0, "spread 1x1 (channel means)": 1, "spread 2x2": 2, "spread 4x4": 4, "spread 8x8": 8}
SAMPLER_SAMPLE = "sampler_sample"  # comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE


@dataclass
class ParticleSettings:
    mode: str
    strength: float
    space: str
    pool_size: int
    bandwidth: float
    start_percent: float
    end_percent: float
    start_coupling: str = "independent"

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
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            fail("start_percent/end_percent", f"must satisfy 0 <= start <= end <= 1 (got {self.start_percent}, "
                 f"{self.end_percent})")
        if self.start_coupling not in COUPLINGS:
            fail("start_coupling", f"must be one of {tuple(COUPLINGS)}, got {self.start_coupling!r}")


def flow_alpha(model_sampling, sigma: float) -> float:
    """``alpha`` in ``x = alpha x0 + sigma eps`` of the model (1 for EPS/V, ``1 - sigma`` for flow models)."""
    one = torch.ones(1, 1)
    return float(model_sampling.noise_scaling(torch.tensor([sigma]), torch.zeros_like(one), one).flatten()[0])


class ParticlePatch:
    """The post-CFG function and the start-coupling sampler wrapper; holds only the settings and a
    once-per-patch log flag (no per-run state)."""

    def __init__(self, settings: ParticleSettings, model_sampling):
        settings.validate()
        self.settings = settings
        self.model_sampling = model_sampling
        self.embedding = make_embedding(SPACES[settings.space], settings.pool_size)
        self.sigma_high = float(model_sampling.percent_to_sigma(settings.start_percent))
        self.sigma_low = float(model_sampling.percent_to_sigma(settings.end_percent))
        self.logged_single = False
        self.key = f"shielded_particle_{id(self)}"

    def __deepcopy__(self, memo):
        """``ModelPatcher.clone()`` deep-copies model_options: share this immutable patch (and its log flag)."""
        return self

    def active(self, sigma: float) -> bool:
        return self.sigma_low <= sigma <= self.sigma_high and self.settings.strength != 0.0

    def __call__(self, args):
        denoised = args["denoised"]
        if denoised.shape[0] < 2:
            if not self.logged_single:
                LOG.info("%s: batch size 1, nothing to repel from; the model runs unchanged", NODE)
                self.logged_single = True
            return denoised
        sigma = float(args["sigma"].flatten()[0])
        if not self.active(sigma) or sigma <= 0:
            return denoised
        return denoised + self.correction(denoised, args["input"], sigma).to(denoised.dtype)

    def correction(self, denoised, x, sigma):
        s = self.settings
        bandwidth = s.bandwidth or None
        if s.mode == "particle guidance":
            return particle_guidance(denoised, s.strength, self.embedding, bandwidth, sigma=sigma).delta
        alpha = flow_alpha(self.model_sampling, sigma)
        score = (alpha * denoised.float() - x.float()) / sigma ** 2
        # Hutchinson draws (edges only) are seeded by the noise level: reruns are reproducible.
        gen = torch.Generator().manual_seed(zlib.crc32(repr(round(sigma, 6)).encode()))
        v = eddy_drift(x, score, self.embedding, bandwidth, probes=EDDY_PROBES, generator=gen)
        return sigma * s.strength * v.float()

    def sampler_wrapper(self, executor, *args, **kwargs):
        """Runs once per sampler run: the sampler gets the coupled noise (``args`` = guider, sigmas, extra_args,
        callback, noise, ...), everything else is passed through."""
        args = list(args)
        if len(args) > 4:
            args[4] = self.couple(args[4])
        else:
            kwargs["noise"] = self.couple(kwargs["noise"])
        return executor(*args, **kwargs)

    def couple(self, noise: torch.Tensor) -> torch.Tensor:
        grid = COUPLINGS[self.settings.start_coupling]
        if noise.shape[0] < 2:
            LOG.info("%s: start coupling: batch size 1, the noise is left as it is", NODE)
            return noise
        if noise.dim() not in (4, 5):
            raise ValueError(f"{NODE}: input 'start_coupling' needs image or video latents ([N, C, H, W] or "
                             f"[N, C, T, H, W]) but this sampler's noise has shape {tuple(noise.shape)}; set "
                             f"start_coupling to 'independent' for this model")
        grid = min(grid, noise.shape[-2], noise.shape[-1])
        m = noise.shape[1] * grid * grid
        _, kind = design(noise.shape[0], m)
        LOG.info("%s: start noise coupled on a %dx%d grid (%d coordinates per image, %s, batch %d): every image "
                 "keeps an exact N(0, I) starting noise, the batch is spread in those coordinates",
                 NODE, grid, grid, m, kind, noise.shape[0])
        return couple_noise(noise, grid)

    def apply(self, model):
        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(self)
        if COUPLINGS[self.settings.start_coupling]:
            patched.add_wrapper_with_key(SAMPLER_SAMPLE, self.key, self.sampler_wrapper)
        return patched


class ParticleGuidance:
    DESCRIPTION = ("Pushes the samples of a batch apart (particle guidance, Corso et al. 2024) or re-couples them "
                   "with a divergence-free drift that keeps the distribution of every sample (EDDY), and/or "
                   "spreads the batch's starting noises with every image's distribution kept exactly (start "
                   "coupling). Batch size 1: no effect.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch."}),
            "mode": (list(MODES), {"default": "particle guidance",
                                   "tooltip": "particle guidance: dense RBF repulsion of the predicted images "
                                              "(more spread, shifts each sample's distribution). EDDY: "
                                              "divergence-free drift on the noisy batch that keeps each sample's "
                                              "distribution exactly (in the exact-score limit); it changes which "
                                              "image each seed gives, not the expected spread."}),
            "strength": ("FLOAT", {"default": 0.2, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Particle guidance: the prediction moves by strength x sigma x a "
                                              "kernel-weighted unit-free direction away from the other samples "
                                              "(0.05-0.5 is typical). EDDY: factor on the divergence-free drift "
                                              "added to dx/dsigma."}),
            "space": (list(SPACES), {"default": "pooled NxN",
                                     "tooltip": "Where similarity is measured: latent (whole latent; repels little "
                                                "in high dimension), pooled NxN (coarse layout), colour (2x2 "
                                                "per-channel means), edges (pooled Sobel magnitude)."}),
            "pool_size": ("INT", {"default": 8, "min": 1, "max": 128,
                                  "tooltip": "Grid size N of 'pooled NxN' and 'edges'."}),
            "bandwidth": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 0.01,
                                    "tooltip": "RBF bandwidth h in squared embedding units; 0 = median rule "
                                               "h = median pairwise squared distance / log(N-1)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Start of the active window as a fraction of the schedule "
                                                   "(0 = first step)."}),
            "end_percent": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "End of the active window (Corso et al. stop at sigma = 1, about "
                                                 "0.6 of an SD1.5 schedule; 1 = last step)."}),
            "start_coupling": (list(COUPLINGS), {"default": "independent",
                                                 "tooltip": "independent: the usual independent starting noises. "
                                                            "spread GxG: the batch's starting noises are spread "
                                                            "apart in their coarse GxG layout (per channel; 1x1 = "
                                                            "channel means) while every image keeps an exactly "
                                                            "standard-normal noise, so each image is distributed "
                                                            "exactly as an unguided one. Adds the most spread to "
                                                            "small batches (2-4). Works with strength 0 (coupling "
                                                            "alone) and with either mode."}),
        }}

    def apply(self, model, mode, strength, space, pool_size, bandwidth, start_percent, end_percent,
              start_coupling="independent"):
        settings = ParticleSettings(mode=mode, strength=float(strength), space=space, pool_size=int(pool_size),
                                    bandwidth=float(bandwidth), start_percent=float(start_percent),
                                    end_percent=float(end_percent), start_coupling=start_coupling)
        patch = ParticlePatch(settings, model.get_model_object("model_sampling"))
        return (patch.apply(model),)


NODE_CLASS_MAPPINGS = {"ParticleGuidance": ParticleGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"ParticleGuidance": "Particle Guidance"}
