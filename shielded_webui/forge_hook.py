"""SPELL on a Forge-family WebUI (Forge, reForge, Forge Neo): a post-CFG function on a clone of the UNet patcher.

Installed from ``Script.process_before_every_sampling`` (called before the first pass and again before a hires
pass), as Forge's own built-in extensions do. The post-CFG function receives the CFG-combined prediction
``denoised`` (x0_hat) in the sampler's space, which is ``process_in(VAE latent)``; shields are stored as VAE
latents, so they are seen through that (scalar affine) map.
"""
from __future__ import annotations

import torch

from guidance.window import SigmaWindow

from . import shield_folder
from .settings import SCRIPT, SettingsError, ShieldedSettings
from .spell_run import SpellRun


def has_forge_objects(sd_model) -> bool:
    return getattr(getattr(sd_model, "forge_objects", None), "unet", None) is not None


def process_in(sd_model):
    """The VAE-latent -> sampler-space map of this checkpoint (reForge: the model's latent format; Forge: the VAE)."""
    unet = sd_model.forge_objects.unet
    config = getattr(unet.model, "model_config", None)
    fmt = getattr(config, "latent_format", None) or getattr(unet.model, "latent_format", None)
    if fmt is not None:
        return fmt.process_in
    vae_model = getattr(getattr(sd_model.forge_objects, "vae", None), "first_stage_model", None)
    if vae_model is not None and hasattr(vae_model, "process_in"):
        return vae_model.process_in
    raise SettingsError(f"{SCRIPT}: cannot find this checkpoint's latent format (neither the UNet's nor the VAE's); "
                        f"shields and history cannot be compared in the sampler's space")


def latent_affine(fn, item_shape: tuple) -> tuple[float, float]:
    """``(scale, shift)`` with ``fn(x) == scale * (x - shift)``; refuses a map that is not scalar affine."""
    zeros, ones = torch.zeros(1, *item_shape), torch.ones(1, *item_shape)
    at0, at1 = fn(zeros).float(), fn(ones).float()
    scale = at1 - at0
    a, b = scale.flatten()[0].item(), at0.flatten()[0].item()
    if at0.shape != zeros.shape or not torch.allclose(scale, torch.full_like(scale, a)) \
            or not torch.allclose(at0, torch.full_like(at0, b)) or a == 0:
        raise SettingsError(f"{SCRIPT}: this model's latent format is not a scalar affine map; shields and history "
                            f"are not supported for it (intra-batch alone works: clear 'Shield folder' and "
                            f"untick 'History')")
    return a, -b / a


def sigma_window(unet, settings: ShieldedSettings) -> SigmaWindow:
    """The active window, from the model's own percent -> sigma map."""
    if settings.start_percent <= 0.0 and settings.end_percent >= 1.0:
        return SigmaWindow()
    sampling = getattr(unet.model, "model_sampling", None) or getattr(unet.model, "predictor", None)
    if sampling is None or not hasattr(sampling, "percent_to_sigma"):
        raise SettingsError(f"{SCRIPT}: this model has no percent -> sigma map, so the active window cannot be "
                            f"placed; set it to 0 .. 1")
    return SigmaWindow.of(sampling.percent_to_sigma, settings.start_percent, settings.end_percent)


def install(p, settings: ShieldedSettings, item_shape: tuple, shield_source=None, shield_name: str = "") -> SpellRun:
    """A new ``SpellRun`` for this pass, installed on a clone of ``p.sd_model.forge_objects.unet``."""
    unet = p.sd_model.forge_objects.unet.clone()
    needs_space = shield_source is not None or settings.history
    scale, shift = latent_affine(process_in(p.sd_model), item_shape) if needs_space else (1.0, 0.0)
    shield_folder.check_shape(shield_source, item_shape)
    run = SpellRun(settings, item_shape, scale, shift, shield_source, sigma_window(unet, settings), shield_name)
    attach_img2img_inputs(run, p)
    unet.set_model_sampler_post_cfg_function(run.post_cfg)
    p.sd_model.forge_objects.unet = unet
    return run


def attach_img2img_inputs(run: SpellRun, p):
    """img2img / inpainting: the init latent and the host's latent mask, as ``p.init`` left them (sampler space).

    The host's CFG denoiser blends every prediction ``x0 * p.nmask + p.init_latent * p.mask`` after the post-CFG
    functions, and ``p.sample`` blends the final samples the same way; ``p.mask`` is a tensor only for inpainting.
    """
    if getattr(p, "is_hr_pass", False):
        return
    init = getattr(p, "init_latent", None)
    if not isinstance(init, torch.Tensor) or tuple(init.shape[1:]) != run.item_shape:
        return
    if isinstance(getattr(p, "mask", None), torch.Tensor) and isinstance(getattr(p, "nmask", None), torch.Tensor):
        run.attach_inpaint(p.nmask, init)
    run.attach_init(init)


def install_refusal(p, message: str):
    """Stop the generation with ``message`` at its first model evaluation (the WebUI shows the error).

    Script callbacks are wrapped by the WebUI (an exception there is only logged), a post-CFG function is not:
    raising from it is the one way a script can stop a generation with a message the user sees.
    """
    unet = p.sd_model.forge_objects.unet.clone()

    def refuse(args):
        raise RuntimeError(message)

    unet.set_model_sampler_post_cfg_function(refuse)
    p.sd_model.forge_objects.unet = unet
