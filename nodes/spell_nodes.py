"""SPELL nodes: "Apply SPELL", "SPELL Sampler", "Latents to Shield Set", "Clear SPELL History"."""
from __future__ import annotations

import logging

from ..guidance import history as spell_history
from .ksampler_core import ksampler_inputs, sample_latent
from .shield_set import SHIELD_SET, ShieldSet
from .spell_hook import INIT_CHOICES, INIT_LEAVE, SpellPatch, SpellSettings

LOG = logging.getLogger("shielded_sampling")
CATEGORY = "sampling/shielded"
SPELL_REPORT = "SPELL_REPORT"

RADIUS_TOOLTIP = (
    "Shield radius, resolution-free: RMS distance per latent element in the model's latent space. "
    "Raw L2 radius = radius x sqrt(C*H*W of one latent), e.g. x128 for a 512x512 SD1.5 latent (4x64x64), "
    "x256 at 1024x1024 (4x128x128), x512 for a 1024x1024 SD3/Flux latent (16x128x128). The paper's radii in "
    "these units: EDMv2 0.16 (diversity) and 0.47 (protection), Latent Diffusion 0.18, MDTv2 0.70, "
    "SD3 0.39 at 1024 px. Good start: the median pairwise distance of an unguided batch, or a fraction of it.")


def spell_inputs() -> dict:
    """The SPELL widgets shared by Apply SPELL and SPELL Sampler."""
    return {
        "radius": ("FLOAT", {"default": 0.2, "min": 0.001, "max": 4.0, "step": 0.001, "round": 0.0001,
                             "display": "slider", "tooltip": RADIUS_TOOLTIP}),
        "overcompensation": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 4.0, "step": 0.05,
                                       "tooltip": "lambda of the paper: 1.0 puts a prediction exactly on the shield's "
                                                  "sphere; larger values (paper: 1.6) push further so the "
                                                  "repellency ends earlier."}),
        "intra_batch": ("BOOLEAN", {"default": True,
                                    "tooltip": "Repel each sample from the other samples of the batch (paper eq. 7) "
                                               "for diverse batches. No effect with batch size 1."}),
        "history": ("BOOLEAN", {"default": False,
                                "tooltip": "Also repel from the final outputs of earlier runs stored under "
                                           "history_name, and add this run's outputs to it."}),
        "history_name": ("STRING", {"default": "default",
                                    "tooltip": "Name of the in-process history (kept until ComfyUI restarts or "
                                               "Clear SPELL History runs)."}),
        "history_size": ("INT", {"default": spell_history.DEFAULT_CAP, "min": 1, "max": 100000,
                                 "tooltip": "Keep at most this many latents in the history (oldest dropped)."}),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                    "tooltip": "Start of the active window as a fraction of the schedule "
                                               "(0 = first step)."}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                  "tooltip": "End of the active window (1 = last step). Below 1 the outputs are "
                                             "no longer guaranteed to stay outside the shields."}),
        "exact": ("BOOLEAN", {"default": False,
                              "tooltip": "At every step, repeat the correction (bounded rounds) until the prediction "
                                         "is outside every shield, even where shields overlap and eq. 5 cancels. "
                                         "The final t = 0 step always does this."}),
        "init_image_shield": (list(INIT_CHOICES), {"default": INIT_LEAVE, "tooltip":
                              "img2img / inpaint from an image that is itself inside a shield (editing a protected "
                              "image): 'leave it' moves the output at least the radius away from that shield too; "
                              "'exclude it' leaves out the shields the input latent lies in, for this run only, so "
                              "the edit may stay close to the protected image. Other shields always apply."}),
    }


def optional_shield_input() -> dict:
    return {"shield_set": (SHIELD_SET, {"tooltip": "Protected latents to stay away from (Shield Set Loader or "
                                                   "Latents to Shield Set). Optional."})}


def make_patch(node: str, radius, overcompensation, intra_batch, history, history_name, history_size,
               start_percent, end_percent, exact, shield_set=None, init_image_shield=INIT_LEAVE) -> SpellPatch:
    settings = SpellSettings(node=node, radius_rms=float(radius), overcompensation=float(overcompensation),
                             intra_batch=bool(intra_batch), history=bool(history),
                             history_name=str(history_name).strip(), history_cap=int(history_size),
                             start_percent=float(start_percent), end_percent=float(end_percent),
                             exact=bool(exact), shield_set=shield_set, init_image_shield=str(init_image_shield))
    return SpellPatch(settings)


def activity_summary(report) -> dict:
    """Small JSON for the front end: per model evaluation, corrected samples and mean relative size."""
    if report is None:
        return {}
    return {
        "radius": report.radius, "radius_rms": report.radius_rms, "elements": report.elements,
        "steps": [s.step for s in report.steps],
        "corrected": [s.corrected for s in report.steps],
        "batch": [s.batch for s in report.steps],
        "relative": [sum(s.relative_size) / max(1, len(s.relative_size)) for s in report.steps],
        "outputs_inside": report.outputs_inside(),
        "summary": report.summary(),
    }


def history_fingerprint(history=False, history_name="default", **_) -> str:
    """With history on, a queued run must re-execute even with unchanged widgets: the history changed."""
    if not history:
        return ""
    name = str(history_name).strip()
    return f"{name}:{spell_history.version(name)}"


class ApplySpell:
    DESCRIPTION = ("Installs SPELL sparse repellency on a model (on the guider's final prediction): works with "
                   "KSampler, KSamplerAdvanced and SamplerCustom(Advanced) with any guider, inpainting masks, "
                   "img2img and hires-fix passes at another resolution.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "The model to patch."}), **spell_inputs()},
                "optional": optional_shield_input()}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return history_fingerprint(**kwargs)

    def apply(self, model, **kwargs):
        return (make_patch("Apply SPELL", **kwargs).apply(model),)


class SpellSampler:
    DESCRIPTION = "KSampler with SPELL sparse repellency; also returns a report of what the repellency did."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", SPELL_REPORT)
    RETURN_NAMES = ("LATENT", "report")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**ksampler_inputs(), **spell_inputs()}, "optional": optional_shield_input()}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return history_fingerprint(**kwargs)

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0, **kwargs):
        patch = make_patch("SPELL Sampler", **kwargs)
        latent = sample_latent(patch.apply(model), seed, steps, cfg, sampler_name, scheduler,
                               positive, negative, latent_image, denoise=denoise)
        report = patch.last_report
        return {"ui": {"spell_activity": [activity_summary(report)]}, "result": (latent, report)}


class LatentsToShieldSet:
    DESCRIPTION = "Makes a shield set from a LATENT batch (e.g. earlier outputs or encoded protected images)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (SHIELD_SET,)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latents": ("LATENT", {"tooltip": "Each latent of the batch becomes one shield."}),
            "name": ("STRING", {"default": "latents", "tooltip": "A label shown in reports."}),
        }}

    def build(self, latents, name):
        samples = latents["samples"]
        if samples.dim() < 3 or samples.shape[0] == 0:
            raise ValueError(f"Latents to Shield Set: input 'latents' is empty or not a batch "
                             f"(shape {tuple(samples.shape)}); connect a LATENT batch with at least one latent")
        try:
            return (ShieldSet.from_latents(samples, name=name),)
        except ValueError as err:
            raise ValueError(f"Latents to Shield Set: input 'latents' is unusable: {err}; decode/re-encode "
                             f"or drop those latents") from err


class ClearSpellHistory:
    DESCRIPTION = "Forgets the outputs stored in a SPELL history (all histories when the name is empty)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "clear"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"history_name": ("STRING", {"default": "default",
                                                         "tooltip": "History to clear; empty clears all."})}}

    @classmethod
    def IS_CHANGED(cls, history_name):
        return float("nan")  # clearing must happen every time it is queued

    def clear(self, history_name):
        dropped = spell_history.clear(history_name.strip())
        LOG.info("Clear SPELL History: dropped %d latents from %s", dropped, history_name.strip() or "all histories")
        return {"ui": {"text": [f"dropped {dropped}"]}}


NODE_CLASS_MAPPINGS = {
    "ShieldedApplySpell": ApplySpell,
    "ShieldedSpellSampler": SpellSampler,
    "ShieldedLatentsToShieldSet": LatentsToShieldSet,
    "ShieldedClearSpellHistory": ClearSpellHistory,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ShieldedApplySpell": "Apply SPELL",
    "ShieldedSpellSampler": "SPELL Sampler",
    "ShieldedLatentsToShieldSet": "Latents to Shield Set",
    "ShieldedClearSpellHistory": "Clear SPELL History",
}
