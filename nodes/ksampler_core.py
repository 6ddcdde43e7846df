"""KSampler's inputs and sampling through the host's public entry point (``comfy.sample.sample``).

SPELL Sampler is "KSampler plus SPELL": it offers KSampler's widgets in KSampler's order (so saved workflows keep
their widget values) and samples exactly as ``nodes.common_ksampler`` does, without importing ComfyUI's core node
module.
"""
from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

RATIO_KEYS = ("downscale_ratio_spacial", "downscale_ratio_temporal")     # newer hosts only


def ksampler_inputs() -> dict:
    """KSampler's required inputs, same names, order and defaults."""
    return {
        "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                         "tooltip": "The random seed used for creating the noise."}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "The number of denoising steps."}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": "Classifier-free guidance scale."}),
        "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampling algorithm."}),
        "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The noise schedule."}),
        "positive": ("CONDITIONING", {"tooltip": "What to include in the image."}),
        "negative": ("CONDITIONING", {"tooltip": "What to exclude from the image."}),
        "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "Share of the schedule to run; below 1 keeps the input's structure "
                                         "(img2img)."}),
    }


def sample_latent(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0):
    """What ``nodes.common_ksampler`` does for KSampler: seeded noise, noise mask, preview callback."""
    ratios = [latent.get(k) for k in RATIO_KEYS]
    image = latent["samples"]
    if any(r is not None for r in ratios):
        image = comfy.sample.fix_empty_latent_channels(model, image, *ratios)
    else:
        image = comfy.sample.fix_empty_latent_channels(model, image)
    noise = comfy.sample.prepare_noise(image, seed, latent.get("batch_index"))
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, image,
                                  denoise=denoise, noise_mask=latent.get("noise_mask"),
                                  callback=latent_preview.prepare_callback(model, steps),
                                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = {k: v for k, v in latent.items() if k not in RATIO_KEYS}
    out["samples"] = samples
    return out
