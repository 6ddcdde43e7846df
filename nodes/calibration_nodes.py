"""Radius calibration: the SPELL paper's recipe (median pairwise distance of an unguided batch) as a node."""
from __future__ import annotations

import math

import torch

from ..guidance.kernels import median_pairwise_distance

CATEGORY = "sampling/shielded"


def model_space(samples: torch.Tensor, model) -> torch.Tensor:
    """LATENT (VAE) space -> the model's space, where SPELL measures distances (``latent_format.process_in``)."""
    if model is None:
        return samples.float()
    return model.model.latent_format.process_in(samples.float())


class SpellRadiusCalibration:
    DESCRIPTION = ("Measures the median pairwise distance of a batch of final latents (generate one batch "
                   "WITHOUT SPELL first), in the units of SPELL's radius slider, and suggests a radius = "
                   "fraction x median. The SPELL paper searched radii from 0 to 2x this median.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("median", "suggested_radius", "text")
    FUNCTION = "calibrate"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latents": ("LATENT", {"tooltip": "Final latents of an unguided batch (KSampler output, batch >= 2, "
                                                  "same prompt and size you will use with SPELL)."}),
                "fraction": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 2.0, "step": 0.01,
                                       "tooltip": "Suggested radius = fraction x median. Larger = stronger "
                                                  "repellency for longer; the paper searched 0 to 2."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "The model SPELL will run on. SPELL measures in the model's latent "
                                               "space (after its latent scaling, e.g. x0.18215 for SD1.5); "
                                               "without it the median is in raw VAE-latent units and too large "
                                               "for the slider by that factor."}),
            },
        }

    def calibrate(self, latents, fraction, model=None):
        samples = latents["samples"]
        if samples.dim() < 3 or samples.shape[0] < 2:
            raise ValueError(f"SPELL Radius Calibration: input 'latents' has shape {tuple(samples.shape)}; it needs "
                             f"a batch of at least 2 latents: set batch_size >= 2 on Empty Latent Image")
        x = model_space(samples, model)
        elements = math.prod(x.shape[1:])
        median_l2 = median_pairwise_distance(x)
        median = median_l2 / math.sqrt(elements)
        suggested = float(fraction) * median
        space = "model space (latent_format.process_in)" if model is not None else \
            "raw VAE-latent space: connect the MODEL for slider units"
        text = (f"median pairwise distance of {samples.shape[0]} latents: {median:.4g} rms per element "
                f"({median_l2:.4g} L2 over {elements} elements), measured in {space}. "
                f"Suggested radius: {suggested:.4g} (= {fraction:g} x median).")
        info = {"median": median, "median_l2": median_l2, "elements": elements, "suggested": suggested,
                "fraction": float(fraction), "batch": int(samples.shape[0]), "model_space": model is not None}
        return {"ui": {"spell_calibration": [info], "text": [text]}, "result": (median, suggested, text)}


NODE_CLASS_MAPPINGS = {"ShieldedSpellRadiusCalibration": SpellRadiusCalibration}
NODE_DISPLAY_NAME_MAPPINGS = {"ShieldedSpellRadiusCalibration": "SPELL Radius Calibration"}
