""""Particle Guidance" node: batch repulsion (Corso et al.) or its divergence-free form (EDDY) as a MODEL patch.

Pure math lives in ``guidance/particle.py``, ``guidance/eddy.py`` and ``guidance/embeddings.py``; this module
is the post-CFG hook and the thin node. The hook edits the CFG-combined prediction ``denoised`` of the whole
batch (k-diffusion convention, ``x = alpha x0 + sigma eps``; ``alpha = 1`` except for flow models):

- particle guidance: ``D' = D + strength * sigma * eta * J^T phi`` (see ``guidance.particle``), on ``D``;
- EDDY drift (paper form): ``D' = D + sigma * strength * v`` with ``v = eddy_drift(x, (alpha D - x) / sigma^2)``
  computed on the noisy batch ``x``; an Euler step then moves ``x`` by ``strength * v * (sigma - sigma_next)``.
  Exact only from independent starts, where it cannot change the batch's joint law.

EDDY (correlated noise, ``guidance/correlated_noise.py``) and start coupling (``guidance/coupling.py``) run in a
``SAMPLER_SAMPLE`` wrapper, once per sampler run: it replaces the unit starting noise (before the sampler scales
it by sigma_max) by exact-marginal coupled noise and, in EDDY mode, hands samplers that take a ``noise_sampler``
an ``EddyNoiseRun`` (``nodes/eddy_noise.py``) for the run, restoring the sampler's options afterwards. Start
coupling works alone (strength 0) or with particle guidance or EDDY.
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass

import torch

from ..guidance.correlated_noise import blend, eddy_noise
from ..guidance.coupling import couple_noise, design
from ..guidance.eddy import eddy_drift
from ..guidance.embeddings import make_embedding
from ..guidance.particle import particle_guidance
from .eddy_noise import START_SEED_OFFSET, EddyNoiseRun, accepts_noise_sampler, seeded_normal
from .hooks import WRAPPERS, SigmaWindow, check_percents, signal_scale

LOG = logging.getLogger("shielded_sampling")
CATEGORY = "sampling/shielded"
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


def auto_grid(channels: int) -> int:
    """The coarsest grid with at least ``AUTO_COORDINATES`` coupled numbers per image: 2x2 for 4-channel latents
    (SD1.5/SDXL), 4x4 for 1-channel, 1x1 for 16-channel (SD3, Flux)."""
    return next((g for g in (1, 2, 4, 8) if channels * g * g >= AUTO_COORDINATES), 8)


class ParticlePatch:
    """The post-CFG function and the sampler wrapper; holds the settings, a once-per-patch log flag and, only
    while a sampler run is inside the wrapper, that run's ``EddyNoiseRun``."""

    def __init__(self, settings: ParticleSettings, model_sampling):
        settings.validate()
        self.settings = settings
        self.model_sampling = model_sampling
        self.embedding = make_embedding(SPACES[settings.space], settings.pool_size)
        self.window = SigmaWindow.of(model_sampling, settings.start_percent, settings.end_percent)
        self.logged_single = False
        self.key = f"shielded_particle_{id(self)}"
        self.run = None

    def __deepcopy__(self, memo):
        """``ModelPatcher.clone()`` deep-copies model_options: share this immutable patch (and its log flag)."""
        return self

    def active(self, sigma: float) -> bool:
        return sigma in self.window and self.settings.strength != 0.0

    def __call__(self, args):
        denoised = args["denoised"]
        if denoised.shape[0] < 2:
            if not self.logged_single:
                LOG.info("%s: batch size 1, nothing to repel from; the model runs unchanged", NODE)
                self.logged_single = True
            return denoised
        if self.settings.mode == EDDY:
            if self.run is not None:
                self.run.record(denoised)
            return denoised
        sigma = float(args["sigma"].flatten()[0])
        if not self.active(sigma) or sigma <= 0:
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
        """Runs once per sampler run (``args`` = guider, sigmas, extra_args, callback, noise, ...): the sampler
        gets the coupled starting noise and, in EDDY mode, EDDY's noise sampler for this run only."""
        args = list(args)
        extra_args = args[2] if len(args) > 2 else kwargs.get("extra_args", {})
        seed = extra_args.get("seed")
        self.check_latent(args[4] if len(args) > 4 else kwargs["noise"])
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
        self.run = run
        try:
            return executor(*args, **kwargs)
        finally:
            self.run = None
            sampler.extra_options = options
            LOG.info("%s: EDDY correlated %d of the sampler's %d noise draws (the others were outside the "
                     "window)", NODE, run.correlated, run.draws)

    def check_latent(self, noise: torch.Tensor):
        """Refuse, before the first step, a latent the chosen space cannot embed (only 'latent' takes any rank)."""
        s = self.settings
        if noise.shape[0] < 2 or s.strength == 0 or SPACES[s.space] == "latent" or noise.dim() in (4, 5):
            return
        if s.mode == EDDY and s.grid() > 0:
            return      # a spread design embeds nothing; start_coupling's own check names that input
        raise ValueError(f"{NODE}: input 'space' is {s.space!r}, which needs image or video latents ([N, C, H, W] "
                         f"or [N, C, T, H, W]), but this model samples latents of shape {tuple(noise.shape)}; set "
                         f"space to 'latent' for this model")

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
        grid = self.resolved_grid(noise)
        return EddyNoiseRun(noise, seed, s.strength, self.embedding, s.bandwidth or None,
                            self.window, grid)

    def start_noise(self, noise: torch.Tensor, seed) -> torch.Tensor:
        """The starting noise: EDDY's (design blended by strength, or kernel-free correlation), the start
        coupling design alone (other modes), or unchanged. A zero noise (noise disabled: KSamplerAdvanced
        add_noise 'disable', a two-pass workflow's second stage, DisableNoise) stays zero."""
        s = self.settings
        if not bool(noise.any()):
            if noise.shape[0] > 1 and (s.grid() or (s.mode == EDDY and s.strength != 0)):
                LOG.info("%s: the sampler's starting noise is zero (noise disabled, e.g. a second sampling stage): "
                         "left at zero, nothing to couple", NODE)
            return noise
        if s.mode == EDDY:
            if noise.shape[0] < 2 or s.strength == 0:
                return noise
            if not self.resolved_grid(noise):
                LOG.info("%s: EDDY: starting noises correlated across the batch of %d (strength %g); every image "
                         "keeps an exact N(0, I) noise", NODE, noise.shape[0], s.strength)
                return eddy_noise(noise, s.strength)
            if s.strength < 1:
                LOG.info("%s: EDDY strength %g blends the spread design with independent noise; on a real model "
                         "the spread fell off quickly below 1 (BENCHMARKS.md), so 1 is recommended", NODE, s.strength)
            coupled = self.couple(noise)
            if s.strength == 1:
                return coupled
            return blend(seeded_normal(noise, seed, START_SEED_OFFSET), coupled, s.strength)
        return self.couple(noise) if s.grid() else noise

    def resolved_grid(self, noise: torch.Tensor) -> int:
        """The grid for this latent: "auto" falls back to 0 (the kernel correlation) for non-image latents."""
        if self.settings.grid() == AUTO and noise.dim() not in (4, 5):
            return 0
        return self.settings.grid() and self.clamped_grid(noise)

    def clamped_grid(self, noise: torch.Tensor) -> int:
        if noise.dim() not in (4, 5):
            raise ValueError(f"{NODE}: input 'start_coupling' needs image or video latents ([N, C, H, W] or "
                             f"[N, C, T, H, W]) but this sampler's noise has shape {tuple(noise.shape)}; set "
                             f"start_coupling to 'independent' for this model")
        grid = self.settings.grid()
        grid = auto_grid(noise.shape[1]) if grid == AUTO else grid
        return min(grid, noise.shape[-2], noise.shape[-1])

    def couple(self, noise: torch.Tensor) -> torch.Tensor:
        if noise.shape[0] < 2:
            LOG.info("%s: start coupling: batch size 1, the noise is left as it is", NODE)
            return noise
        grid = self.clamped_grid(noise)
        m = noise.shape[1] * grid * grid
        _, kind = design(noise.shape[0], m)
        LOG.info("%s: start noise coupled on a %dx%d grid (%d coordinates per image, %s, batch %d): every image "
                 "keeps an exact N(0, I) starting noise, the batch is spread in those coordinates",
                 NODE, grid, grid, m, kind, noise.shape[0])
        return couple_noise(noise, grid)

    def apply(self, model):
        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(self)
        patched.add_wrapper_with_key(WRAPPERS.SAMPLER_SAMPLE, self.key, self.sampler_wrapper)
        return patched


class ParticleGuidance:
    DESCRIPTION = ("Makes the images of a batch differ more. particle guidance (Corso et al. 2024) pushes the "
                   "predicted images apart (strong, but shifts what each image looks like). EDDY couples the "
                   "random noise of the batch so the images' noises point apart: every image keeps exactly the "
                   "distribution it has without the node, the batch spreads. Start coupling spreads the "
                   "starting noises the same exact way. Batch size 1: no effect.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch."}),
            "mode": (list(MODES), {"default": PG,
                                   "tooltip": "particle guidance: dense RBF repulsion of the predicted images (most "
                                              "spread, but shifts each image's distribution). EDDY: the batch's "
                                              "starting noise and the fresh noise of ancestral/SDE samplers are "
                                              "coupled so the images' noises point apart (see start_coupling); "
                                              "each image "
                                              "stays exactly distributed as without the node (best with "
                                              "euler_ancestral, dpmpp_2m_sde, ...; ODE samplers such as euler or "
                                              "dpmpp_2m only get the coupled start). EDDY drift (paper form): the "
                                              "divergence-free drift of the EDDY paper; it keeps each image's "
                                              "distribution and changes which image a seed gives, but not the "
                                              "expected spread (for research)."}),
            "strength": ("FLOAT", {"default": 0.2, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "particle guidance: the prediction moves by strength x sigma x a "
                                              "kernel-weighted unit-free direction away from the other samples "
                                              "(0.05-0.5 is typical). EDDY: how much noise is coupled, 0..1 "
                                              "(use 1: on a real model the spread fell off quickly below it); "
                                              "with start_coupling 'independent' the look-alike correlation in "
                                              "[-1, 1], negative = a more alike batch. EDDY drift: factor on "
                                              "the drift added to dx/dsigma (0.1-0.5; 1 and more can make the "
                                              "steps unstable)."}),
            "space": (list(SPACES), {"default": "pooled NxN",
                                     "tooltip": "Where similarity is measured (EDDY: which images count as "
                                                "look-alikes): latent (whole latent; repels little in high "
                                                "dimension), pooled NxN (coarse layout), colour (2x2 per-channel "
                                                "means), edges (pooled Sobel magnitude)."}),
            "pool_size": ("INT", {"default": 8, "min": 1, "max": 128,
                                  "tooltip": "Grid size N of 'pooled NxN' and 'edges'."}),
            "bandwidth": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 0.01,
                                    "tooltip": "RBF bandwidth h in squared embedding units; 0 = median rule "
                                               "h = median pairwise squared distance / log(N-1)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Start of the active window as a fraction of the schedule "
                                                   "(0 = first step). EDDY correlates the noise drawn inside the "
                                                   "window; its starting noise is always coupled."}),
            "end_percent": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "End of the active window (Corso et al. stop at sigma = 1, about "
                                                 "0.6 of an SD1.5 schedule; 1 = last step)."}),
            "start_coupling": (list(COUPLINGS), {"default": "auto",
                                                 "tooltip": "auto: in EDDY mode the coarsest spread grid "
                                                            "with >= 16 numbers per image (2x2 for SD1.5/SDXL "
                                                            "latents, 1x1 for 16-channel SD3/Flux ones); "
                                                            "independent in the other modes. independent: the "
                                                            "usual independent starting noises (EDDY then "
                                                            "correlates the whole noise by the look-alike "
                                                            "kernel). spread GxG: the batch's "
                                                            "noises are spread apart in their coarse GxG layout "
                                                            "(per channel; 1x1 = channel means) while every image "
                                                            "keeps an exactly standard-normal noise, so each image "
                                                            "is distributed exactly as an unguided one; in EDDY "
                                                            "mode also every fresh noise draw of ancestral/SDE "
                                                            "samplers, blended by strength. Adds the most spread "
                                                            "to small batches (2-4). Not with EDDY drift."}),
        }}

    def apply(self, model, mode, strength, space, pool_size, bandwidth, start_percent, end_percent,
              start_coupling="auto"):
        settings = ParticleSettings(mode=mode, strength=float(strength), space=space, pool_size=int(pool_size),
                                    bandwidth=float(bandwidth), start_percent=float(start_percent),
                                    end_percent=float(end_percent), start_coupling=start_coupling)
        patch = ParticlePatch(settings, model.get_model_object("model_sampling"))
        return (patch.apply(model),)


NODE_CLASS_MAPPINGS = {"ParticleGuidance": ParticleGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"ParticleGuidance": "Particle Guidance"}
