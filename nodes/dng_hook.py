"""DNG inside ComfyUI's sampler: the hooks behind "Dynamic Negative Guidance" (MODEL patch) and
"Dynamic Negative Guider" (GUIDER).

Result of every model evaluation (text-to-image form of the paper: the base prediction is the positive one)::

    D = CFG(positive, negative) - lam_t * (D_concept - D_positive),  lam_t = lam0 p / (1 - p)  (or lam0: constant)

Host hooks (all public ComfyUI extension points, no override of CFGGuider.sample/outer_sample/inner_sample):

* ``WrappersMP.OUTER_SAMPLE`` wrapper, once per sampling run: adds the concept under a private key to the
  guider's ``conds`` *before* the host processes them (so areas, masks, timestep ranges, hooks and
  model-specific encodings are handled by ComfyUI exactly as for positive/negative), and creates the per-run
  state (fresh posterior at the prior, start/end sigmas) in the run's own ``model_options`` (``run_state.py``),
  dropped when the run ends or raises, so it never leaks into the next queue run.
* ``WrappersMP.CALC_COND_BATCH`` wrapper (patch route): when the host evaluates the guider's own
  ``[positive, negative]`` pair (recognised by identity of the positive cond list) it appends the concept, so
  the three predictions come out of the *same* batched model call, and strips the third output, keeping it
  for the post-CFG function. Wrappers compose, unlike the single ``sampler_calc_cond_batch_function`` slot.
* ``sampler_post_cfg_function`` (patch route): updates the posterior from the state reached since the last
  call (guidance.dng mapping), computes the scale, records the trace and applies the term.
* The GUIDER route (SamplerCustomAdvanced) is a ``CFGGuider`` with three conds whose ``predict_noise`` makes
  one ``calc_cond_batch([positive, negative, concept])`` call (as ComfyUI's PerpNegGuider does), runs the
  pre-CFG functions and ``cfg_function`` (so other post-CFG patches still apply) and then the DNG term.

The report output (``DNG_REPORT``, a ``guidance.dng.DngTrace``) is filled during sampling: the MODEL-patch
node runs before the KSampler, so downstream nodes receive the trace object the patch fills in; it always
shows the latest run made with that patched model (cleared at the start of every run).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

import comfy.sampler_helpers
import comfy.samplers

from ..guidance.dng import DngParams, DngTrace, PosteriorTracker, add_negative_guidance
from ..guidance.window import SigmaWindow
from .hooks import WRAPPERS, check_percents, sigma_window, signal_scale
from .run_state import find_run_state, keep_run_state, state_key

LOG = logging.getLogger("shielded_sampling")


def check_concept(node: str, concept) -> None:
    """Missing or empty concept conditioning -> a clear error naming the node and the fix."""
    fix = "connect a CLIP Text Encode of the concept to avoid (e.g. 'a dog')"
    if concept is None or not isinstance(concept, (list, tuple)) or len(concept) == 0:
        raise ValueError(f"{node}: input 'concept' is missing or empty; {fix}")
    for entry in concept:
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[0], torch.Tensor):
            raise ValueError(f"{node}: input 'concept' is not a CONDITIONING (got {type(entry).__name__}); {fix}")
        if entry[0].numel() == 0:
            raise ValueError(f"{node}: input 'concept' holds an empty conditioning tensor of shape "
                             f"{tuple(entry[0].shape)}; {fix}")


def make_params(node: str, scale, prior, temperature, offset, p_max, p_min, mode) -> DngParams:
    """The node's inputs as ``DngParams``; a bad value raises the params' own message, prefixed by the node."""
    try:
        return DngParams(lam0=float(scale), prior=float(prior), tau=float(temperature), delta=float(offset),
                         p_min=float(p_min), p_max=float(p_max), mode=str(mode))
    except ValueError as err:
        raise ValueError(f"{node}: {err}") from err


@dataclass
class DngRun:
    """Per-run state, created by the OUTER_SAMPLE wrapper and stored in that run's model_options."""

    guider: object
    tracker: PosteriorTracker
    window: SigmaWindow
    model_sampling: object
    pending: tuple | None = None   # (sigma, concept prediction) from the current calc_cond_batch call
    warned: bool = False


class DngSession:
    """One configured DNG: installs the hooks, owns the trace of the latest run."""

    def __init__(self, node: str, concept, params: DngParams, start_percent: float, end_percent: float):
        check_concept(node, concept)
        check_percents(node, start_percent, end_percent)
        self.node, self.concept, self.params = node, concept, params
        self.start_percent, self.end_percent = float(start_percent), float(end_percent)
        self.key = state_key("dng", self)
        self.trace = DngTrace.for_params(params)

    def __deepcopy__(self, memo):
        # ComfyUI 0.3.x's ModelPatcher.clone() deep-copies model_options (later releases copy only dicts and
        # lists): a downstream clone must keep filling this trace.
        return self

    # -- installation --------------------------------------------------------------------------------
    def patch_model(self, model_patcher):
        m = model_patcher.clone()
        m.add_wrapper_with_key(WRAPPERS.OUTER_SAMPLE, self.key, self.outer_sample_wrapper)
        m.add_wrapper_with_key(WRAPPERS.CALC_COND_BATCH, self.key, self.calc_cond_batch_wrapper)
        m.set_model_sampler_post_cfg_function(self.post_cfg)
        return m

    def guider_model(self, model_patcher):
        m = model_patcher.clone()
        m.add_wrapper_with_key(WRAPPERS.OUTER_SAMPLE, self.key, self.outer_sample_wrapper)
        return m

    # -- per run -------------------------------------------------------------------------------------
    def outer_sample_wrapper(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        injected = self.key not in guider.conds
        if injected:  # patch route: let the host process the concept like positive/negative
            guider.conds[self.key] = [c.copy() for c in comfy.sampler_helpers.convert_cond(self.concept)]
        model_sampling = guider.model_patcher.get_model_object("model_sampling")
        run = DngRun(guider=guider, tracker=PosteriorTracker(self.params, noise.shape[0]),
                     window=sigma_window(model_sampling, self.start_percent, self.end_percent),
                     model_sampling=model_sampling)
        self.trace.start_run()
        try:
            with keep_run_state(guider.model_options, self.key, run):
                return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            if injected:
                getattr(guider, "conds", {}).pop(self.key, None)
            LOG.info("%s: %s", self.node, self.trace.summary())

    def run_state(self, model_options: dict) -> DngRun | None:
        return find_run_state(model_options, self.key)

    # -- per model evaluation --------------------------------------------------------------------------
    def calc_cond_batch_wrapper(self, executor, model, conds, x_in, timestep, model_options):
        run = self.run_state(model_options)
        guider_conds = getattr(run.guider, "conds", {}) if run is not None else {}
        concept = guider_conds.get(self.key)
        if run is None or concept is None or not conds or conds[0] is not guider_conds.get("positive"):
            return executor(model, conds, x_in, timestep, model_options)
        out = executor(model, list(conds) + [concept], x_in, timestep, model_options)
        run.pending = (timestep, out[-1])
        return out[:-1]

    def post_cfg(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        run = self.run_state(args["model_options"])
        if run is None:
            return denoised
        pending, run.pending = run.pending, None
        if pending is None or pending[1].shape != denoised.shape:
            raise ValueError(f"{self.node}: the guider {type(run.guider).__name__} combines its predictions itself "
                             f"(e.g. DualCFGGuider), so the concept is never evaluated and DNG would silently do "
                             f"nothing; use KSampler, CFGGuider/BasicGuider with this model, or the Dynamic "
                             f"Negative Guider node")
        return self.guide(run, args["input"], args["sigma"], args["cond_denoised"], pending[1], denoised)

    def guide(self, run: DngRun, x, sigma, d_base, d_concept, denoised):
        """Posterior update (state reached since the last call), scale, trace, negative term."""
        sigma_t = sigma if isinstance(sigma, torch.Tensor) else torch.tensor([float(sigma)])
        s = float(sigma_t.reshape(-1)[0])
        alpha = torch.tensor(signal_scale(run.model_sampling, s), dtype=torch.float64)
        p = run.tracker.observe(x, sigma_t, d_base, d_concept, alpha=alpha)
        lam = self.params.scale(p) if s in run.window else torch.zeros_like(p)
        self.trace.record(s, p, lam)
        if not bool((lam != 0).any()):
            return denoised
        return add_negative_guidance(denoised, d_base, d_concept, lam)


class DynamicNegativeGuider(comfy.samplers.CFGGuider):
    """CFG guider with a third, concept cond: one batched call for positive, negative and concept."""

    def __init__(self, model_patcher, session: DngSession):
        super().__init__(model_patcher)
        self.session = session

    def set_conds(self, positive, negative, concept):
        self.inner_set_conds({"positive": positive, "negative": negative, self.session.key: concept})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive = self.conds.get("positive")
        negative = self.conds.get("negative")
        concept = self.conds.get(self.session.key)
        if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            negative = None
        conds = [positive, negative, concept]
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            out = fn(args)
        denoised = comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                               model_options=model_options, cond=positive, uncond=negative)
        run = self.session.run_state(model_options)
        if run is None:
            return denoised
        return self.session.guide(run, x, timestep, out[0], out[2], denoised)
