"""DNG nodes: "Dynamic Negative Guidance" (MODEL patch) and "Dynamic Negative Guider" (GUIDER).

The concept to avoid comes in as its own CONDITIONING; KSampler's positive/negative keep their CFG roles.
Result of every model evaluation (text-to-image form of the paper: the base prediction is the positive one)::

    D = CFG(positive, negative) - lam_t * (D_concept - D_positive),  lam_t = lam0 p / (1 - p)  (or lam0: constant)

Host hooks (all public ComfyUI extension points, no override of CFGGuider.sample/outer_sample/inner_sample):

* ``WrappersMP.OUTER_SAMPLE`` wrapper, once per sampling run: adds the concept under a private key to the
  guider's ``conds`` *before* the host processes them (so areas, masks, timestep ranges, hooks and
  model-specific encodings are handled by ComfyUI exactly as for positive/negative), and creates the per-run
  state (fresh posterior at the prior, start/end sigmas) inside the run's own ``model_options`` clone, so it
  dies with the run and never leaks into the next queue run.
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

import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers

from ..guidance.dng import MODES, DngParams, DngTrace, PosteriorTracker, add_negative_guidance

LOG = logging.getLogger("shielded_sampling")
CATEGORY = "sampling/shielded"
DNG_REPORT = "DNG_REPORT"
WRAPPERS = comfy.patcher_extension.WrappersMP


def dng_inputs() -> dict:
    """The DNG widgets shared by the patch and the guider."""
    return {
        "concept": ("CONDITIONING", {"tooltip": "The concept to keep out of the image (encode it with CLIP Text "
                                                "Encode). Its prediction is batched with positive/negative."}),
        "scale": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                            "tooltip": "lam0. Dynamic mode applies lam0 * p / (1 - p); the paper uses about 10x "
                                       "the scale negative prompting needs (NP ~0.5-3.4, DNG ~5-27)."}),
        "prior": ("FLOAT", {"default": 0.01, "min": 1e-6, "max": 0.999999, "step": 0.001, "round": 1e-6,
                            "tooltip": "Initial posterior p(c-) that a sample shows the concept, strictly between 0 "
                                       "and 1. Paper, text-to-image: 0.01."}),
        "temperature": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 10.0, "step": 0.01,
                                  "tooltip": "tau: weight of the evidence of each step (1 = plain Bayes update). "
                                             "Paper: 0.2-0.3."}),
        "offset": ("FLOAT", {"default": 0.002, "min": -1.0, "max": 1.0, "step": 0.0001, "round": 1e-6,
                             "tooltip": "delta: bias added to every step's evidence, pushes the posterior up. Paper: "
                                        "2e-4..4e-3 for 1000 DDPM steps; it acts per step, so fewer steps need a "
                                        "larger value for the same effect."}),
        "p_max": ("FLOAT", {"default": 0.9, "min": 1e-5, "max": 0.999999, "step": 0.01, "round": 1e-6,
                            "tooltip": "Upper clamp of the posterior; caps the scale at lam0 * p_max / (1 - p_max). "
                                       "Paper: 0.8-0.99."}),
        "p_min": ("FLOAT", {"default": 1e-6, "min": 1e-12, "max": 0.99, "step": 1e-6, "round": 1e-12,
                            "tooltip": "Lower clamp of the posterior (lets it recover later). Must be below p_max."}),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                    "tooltip": "Guidance is applied from this fraction of the schedule on (the "
                                               "posterior is tracked throughout)."}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                  "tooltip": "Guidance is applied up to this fraction of the schedule."}),
        "mode": (list(MODES), {"default": "dynamic",
                               "tooltip": "dynamic: scale follows the tracked posterior (DNG). constant: scale = "
                                          "lam0 at every step, i.e. classic negative prompting."}),
    }


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
    """DngParams with errors that name the node and the input."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"{node}: input 'prior' must lie strictly between 0 and 1 (got {prior}); the paper uses 0.01")
    if not 0.0 < p_min < p_max < 1.0:
        raise ValueError(f"{node}: inputs 'p_min'/'p_max' need 0 < p_min < p_max < 1 (got p_min={p_min}, "
                         f"p_max={p_max}); e.g. p_min=1e-6, p_max=0.9")
    try:
        return DngParams(lam0=float(scale), prior=float(prior), tau=float(temperature), delta=float(offset),
                         p_min=float(p_min), p_max=float(p_max), mode=str(mode))
    except ValueError as err:
        raise ValueError(f"{node}: {err}") from err


def signal_scale(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """``alpha`` with ``x = alpha (x0 + sigma_ve n)``: 1 for eps/v models, ``1 - s`` for flow (CONST) models."""
    try:
        s = sigma.reshape(-1)[:1].float().cpu()
        return model_sampling.noise_scaling(s, torch.zeros(1, 1), torch.ones(1, 1)).reshape(-1)[0].double()
    except Exception:  # a model sampling without noise_scaling: plain VE
        return torch.tensor(1.0, dtype=torch.float64)


@dataclass
class DngRun:
    """Per-run state, created by the OUTER_SAMPLE wrapper and stored in that run's model_options."""

    guider: object
    tracker: PosteriorTracker
    sigma_start: float
    sigma_end: float
    model_sampling: object
    pending: tuple | None = None   # (sigma, concept prediction) from the current calc_cond_batch call
    warned: bool = False

    def in_window(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


class DngSession:
    """One configured DNG: installs the hooks, owns the trace of the latest run."""

    def __init__(self, node: str, concept, params: DngParams, start_percent: float, end_percent: float):
        check_concept(node, concept)
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"{node}: inputs 'start_percent'/'end_percent' need 0 <= start <= end <= 1 "
                             f"(got {start_percent}, {end_percent})")
        self.node, self.concept, self.params = node, concept, params
        self.start_percent, self.end_percent = float(start_percent), float(end_percent)
        self.key = f"shielded_dng_{id(self)}"
        self.trace = DngTrace.for_params(params)

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; a downstream clone must keep filling this trace.
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
                     sigma_start=float(model_sampling.percent_to_sigma(self.start_percent)),
                     sigma_end=float(model_sampling.percent_to_sigma(self.end_percent)),
                     model_sampling=model_sampling)
        guider.model_options.setdefault("transformer_options", {})[self.key] = run
        self.trace.start_run()
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            if injected:
                getattr(guider, "conds", {}).pop(self.key, None)
            LOG.info("%s: %s", self.node, self.trace.summary())

    def run_state(self, model_options: dict) -> DngRun | None:
        return model_options.get("transformer_options", {}).get(self.key)

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
        alpha = signal_scale(run.model_sampling, sigma_t)
        p = run.tracker.observe(x, sigma_t, d_base, d_concept, alpha=alpha)
        s = float(sigma_t.reshape(-1)[0])
        lam = self.params.scale(p) if run.in_window(s) else torch.zeros_like(p)
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


def settings_of(kwargs: dict, node: str):
    params = make_params(node, kwargs["scale"], kwargs["prior"], kwargs["temperature"], kwargs["offset"],
                         kwargs["p_max"], kwargs["p_min"], kwargs["mode"])
    return params, float(kwargs["start_percent"]), float(kwargs["end_percent"])


class DynamicNegativeGuidance:
    NODE = "Dynamic Negative Guidance"
    DESCRIPTION = ("A negative prompt that switches itself off when the concept is absent (Koulischer et al., "
                   "ICLR 2025): patches the model so KSampler also predicts the concept in the same batched call "
                   "and subtracts it with a scale that follows the posterior that the sample shows the concept. "
                   "The report shows the latest run.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", DNG_REPORT)
    RETURN_NAMES = ("MODEL", "report")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "The model to patch; use it in KSampler as usual."}),
                             **dng_inputs()}}

    def apply(self, model, concept=None, **kwargs):
        params, start, end = settings_of(kwargs, self.NODE)
        session = DngSession(self.NODE, concept, params, start, end)
        return (session.patch_model(model), session.trace)


class DynamicNegativeGuiderNode:
    NODE = "Dynamic Negative Guider"
    DESCRIPTION = ("Guider for SamplerCustomAdvanced: CFG on positive/negative plus dynamic negative guidance "
                   "away from the concept, all three predictions in one batched model call.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDER", DNG_REPORT)
    RETURN_NAMES = ("GUIDER", "report")
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to sample with."}),
            "positive": ("CONDITIONING", {"tooltip": "What the image should show (CFG positive)."}),
            "negative": ("CONDITIONING", {"tooltip": "CFG negative / unconditional prompt (often empty)."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale between positive and negative; 1 skips "
                                         "the negative prediction."}),
            **dng_inputs()}}

    def get_guider(self, model, positive, negative, cfg, concept=None, **kwargs):
        params, start, end = settings_of(kwargs, self.NODE)
        session = DngSession(self.NODE, concept, params, start, end)
        guider = DynamicNegativeGuider(session.guider_model(model), session)
        guider.set_conds(positive, negative, concept)
        guider.set_cfg(cfg)
        return (guider, session.trace)


NODE_CLASS_MAPPINGS = {
    "ShieldedDynamicNegativeGuidance": DynamicNegativeGuidance,
    "ShieldedDynamicNegativeGuider": DynamicNegativeGuiderNode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ShieldedDynamicNegativeGuidance": "Dynamic Negative Guidance",
    "ShieldedDynamicNegativeGuider": "Dynamic Negative Guider",
}
