""""Particle Guidance" node: one node, two mechanisms, each its own patch.

- A prediction edit (``nodes/particle_patch.py``): particle guidance (Corso et al.) or the EDDY paper's drift,
  a post-CFG function on the batch's prediction.
- A noise replacement (``nodes/noise_patch.py``): start coupling and EDDY's exact-marginal correlated noise, a
  sampler wrapper.

The node validates its inputs once and installs the patches its settings need. Theory:
``docs/particle_eddy_theory.md``.
"""
from __future__ import annotations

from .noise_patch import NoisePatch
from .particle_patch import PredictionPatch
from .particle_settings import COUPLINGS, EDDY, MODES, PG, SPACES, ParticleSettings

CATEGORY = "sampling/shielded"


def patched_model(model, settings: ParticleSettings):
    """``model`` with the patches ``settings`` need: the prediction edit (particle guidance, EDDY drift) and/or
    the noise replacement (EDDY, start coupling)."""
    settings.validate()
    model_sampling = model.get_model_object("model_sampling")
    noise = settings.mode == EDDY or bool(settings.grid())
    if settings.mode != EDDY and settings.strength != 0:
        model = PredictionPatch(settings, model_sampling).apply(model, check_latent=not noise)
    if noise:
        model = NoisePatch(settings, model_sampling).apply(model)
    return model


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
                                   "tooltip": "particle guidance: pushes the predicted images apart (most spread; "
                                              "shifts each image's look). EDDY: couples the batch's noise so the "
                                              "images spread while each keeps exactly its unguided distribution "
                                              "(best with ancestral/SDE samplers). EDDY drift: the paper's drift, "
                                              "for research. Details: the node's help page."}),
            "strength": ("FLOAT", {"default": 0.2, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "particle guidance: push size, 0.05-0.5 is typical. EDDY: share of "
                                              "the noise coupled, 0..1 (1 recommended); with start_coupling "
                                              "'independent' a correlation in [-1, 1], negative = a more alike "
                                              "batch. EDDY drift: 0.1-0.5."}),
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
                                                 "tooltip": "spread GxG: the batch's starting noises are spread "
                                                            "apart in their coarse GxG layout while each image's "
                                                            "noise stays exactly standard normal. auto: EDDY "
                                                            "picks the coarsest grid with >= 16 numbers per image; "
                                                            "the other modes start independent. Not with EDDY "
                                                            "drift."}),
        }}

    def apply(self, model, mode, strength, space, pool_size, bandwidth, start_percent, end_percent,
              start_coupling="auto"):
        settings = ParticleSettings(mode=mode, strength=float(strength), space=space, pool_size=int(pool_size),
                                    bandwidth=float(bandwidth), start_percent=float(start_percent),
                                    end_percent=float(end_percent), start_coupling=start_coupling)
        return (patched_model(model, settings),)


NODE_CLASS_MAPPINGS = {"ParticleGuidance": ParticleGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"ParticleGuidance": "Particle Guidance"}
