"""DNG nodes: "Dynamic Negative Guidance" (MODEL patch) and "Dynamic Negative Guider" (GUIDER); the hooks are in
``nodes/dng_hook.py``, the math in ``guidance/dng.py``.

The concept to avoid comes in as its own CONDITIONING; KSampler's positive/negative keep their CFG roles.
"""
from __future__ import annotations

from ..guidance.dng import MODES
from .dng_hook import DngSession, DynamicNegativeGuider, make_params

CATEGORY = "sampling/shielded"
DNG_REPORT = "DNG_REPORT"


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
