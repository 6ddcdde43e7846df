"""SPELL on Automatic1111 without Forge: two global script callbacks around the WebUI's CFG denoiser.

``on_cfg_denoiser`` sees the denoiser (and through ``denoiser.p`` the generation), the model input ``x`` and
``sigma``; ``on_cfg_after_cfg`` sees the CFG-combined prediction, already blended with the init latent where an
inpainting mask keeps it, and may replace it. For k-diffusion samplers that prediction is x0_hat; for A1111's
DDIM / PLMS / UniPC (``CFGDenoiserTimesteps``) it is a noise estimate eps at an integer timestep, converted to
x0_hat with the denoiser's own ``get_pred_x0``, corrected, and converted back. Forge-family denoisers fire the
same callbacks with x0_hat and a real sigma for every sampler (``classic_ddim_eps_estimation``).

The WebUI wraps every callback in ``try/except`` and only logs what it raises, so a failure here never raises:
it is recorded on the generation (``ShieldedProcessing.stop``), which interrupts it and says why under the image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from guidance.window import SigmaWindow

from .settings import SCRIPT, STATE_ATTRIBUTE, SettingsError, ShieldedSettings


@dataclass
class PendingCall:
    """One CFG denoiser call between its two callbacks."""
    state: object          # webui_script.ShieldedProcessing
    p: object
    x: torch.Tensor        # the model input (A1111: cond rows then the batch itself, last)
    sigma: torch.Tensor    # per row of x: sigma, or an integer timestep for CFGDenoiserTimesteps
    denoiser: object


_PENDING: PendingCall | None = None


def predicts_noise(denoiser) -> bool:
    """A1111's DDIM / PLMS / UniPC denoiser: its combined prediction is eps (Forge converts it to x0 first)."""
    return hasattr(denoiser, "alphas") and hasattr(denoiser, "get_pred_x0") \
        and not getattr(denoiser, "classic_ddim_eps_estimation", False)


def eps_shift(alpha_bar: torch.Tensor, x0_delta: torch.Tensor) -> torch.Tensor:
    """Change of eps that moves the DDIM x0 estimate ``(x_t - sqrt(1 - a) eps) / sqrt(a)`` by ``x0_delta``."""
    return -(alpha_bar.sqrt() / (1 - alpha_bar).sqrt()) * x0_delta


def sigma_of_alpha_bar(alpha_bar: float) -> float:
    """The k-diffusion sigma of a DDPM timestep: ``sqrt((1 - a) / a)`` (DDPM eq. 4 in the VE parametrisation)."""
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def percent_to_sigma(alphas_cumprod: torch.Tensor, percent: float) -> float:
    """ComfyUI's ``ModelSamplingDiscrete.percent_to_sigma`` from the checkpoint's ``alphas_cumprod`` (log-linear)."""
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return 0.0
    alphas = alphas_cumprod.detach().to("cpu", torch.float64)   # the model's buffer may sit on MPS (no float64)
    log_sigmas = (((1 - alphas) / alphas).sqrt()).log()
    t = (1.0 - percent) * (len(log_sigmas) - 1)
    low, w = int(math.floor(t)), t - math.floor(t)
    high = min(low + 1, len(log_sigmas) - 1)
    return float(((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp())


def sigma_window(sd_model, settings: ShieldedSettings) -> SigmaWindow:
    if settings.start_percent <= 0.0 and settings.end_percent >= 1.0:
        return SigmaWindow()
    alphas = getattr(sd_model, "alphas_cumprod", None)
    if alphas is None:
        raise SettingsError(f"{SCRIPT}: this checkpoint has no alphas_cumprod, so the active window cannot be "
                            f"placed; set it to 0 .. 1")
    return SigmaWindow.of(lambda percent: percent_to_sigma(alphas.cpu(), percent), settings.start_percent,
                          settings.end_percent)


def latent_scale(sd_model) -> tuple[float, float]:
    """``(scale, shift)`` of A1111's sampler space over the VAE latent: ``scale_factor * latent`` (SD1.x / SD2.x)."""
    scale = getattr(sd_model, "scale_factor", None)
    if scale is None or not float(scale) or getattr(sd_model, "is_sd3", False):
        raise SettingsError(f"{SCRIPT}: this checkpoint has no latent scale factor; shields and history are not "
                            f"supported for it (intra-batch alone works: clear 'Shield folder' and untick 'History')")
    return float(scale), 0.0


# -- the two callbacks (registered once by scripts/shielded_sampling.py) ------------------------------------------
def on_cfg_denoiser(params):
    global _PENDING
    _PENDING = None
    denoiser = getattr(params, "denoiser", None)
    p = getattr(denoiser, "p", None)
    state = getattr(p, STATE_ATTRIBUTE, None)
    if state is None or not state.uses_callbacks():
        return
    _PENDING = PendingCall(state, p, params.x, params.sigma, denoiser)


def on_cfg_after_cfg(params):
    global _PENDING
    call, _PENDING = _PENDING, None
    if call is None:
        return
    try:
        params.x = correct(call, params.x)
    except Exception as err:   # the WebUI would only log it and keep the uncorrected prediction: never silently
        call.state.stop(call.p, f"{SCRIPT}: SPELL failed during sampling: {type(err).__name__}: {err}")


def correct(call: PendingCall, prediction: torch.Tensor) -> torch.Tensor:
    """The corrected combined prediction of one denoiser call (same parametrisation as it came)."""
    run = call.state.callback_run(call.p, tuple(prediction.shape[1:]))
    if run is None:
        return prediction
    b = prediction.shape[0]
    x_t, sigma = call.x[-b:], call.sigma[-b:]
    eps = predicts_noise(call.denoiser)
    if eps:
        alpha_bar = call.denoiser.alphas.to(sigma.device)[sigma.long()].to(prediction)[:, None, None, None]
        x0_hat = call.denoiser.get_pred_x0(x_t, prediction, sigma)
        sigma_value = sigma_of_alpha_bar(float(alpha_bar.flatten()[0]))
    else:
        x0_hat, sigma_value = prediction, float(sigma.flatten()[0])
    run.evaluations += 1
    if not run.in_window(sigma_value):
        run.record_step(sigma_value, x0_hat, x_t, None)
        return prediction
    corrected = run.correct(x0_hat, x_t, sigma_value, blended=True)
    if not eps:
        return corrected
    return prediction + eps_shift(alpha_bar, (corrected - x0_hat).to(prediction))
