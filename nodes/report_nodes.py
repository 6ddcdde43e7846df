"""Report nodes: "SPELL Report" (activity chart, nearest-shield panel) and "DNG Report" (posterior and scale)."""
from __future__ import annotations

import logging

import numpy as np
import torch

import nodes as comfy_nodes

from ..reporting import plots
from .shield_set import SHIELD_SET

LOG = logging.getLogger("shielded_sampling")
CATEGORY = "sampling/shielded"
SPELL_REPORT = "SPELL_REPORT"       # nodes.spell_nodes.SPELL_REPORT
DNG_REPORT = "DNG_REPORT"           # nodes.dng_nodes output type (a guidance.dng.DngTrace)


def to_image(fig: plots.Figure) -> torch.Tensor:
    """A figure as a one-image ComfyUI IMAGE batch ``[1, H, W, 3]``."""
    return torch.from_numpy(fig.to_array())[None]


def preview(images: list[torch.Tensor], prefix: str) -> list[dict]:
    """Save figures to ComfyUI's temp folder so the node shows them (what Preview Image does)."""
    out = []
    for image in images:
        out += comfy_nodes.PreviewImage().save_images(image, filename_prefix=prefix)["ui"]["images"]
    return out


def image_array(images: torch.Tensor | None) -> np.ndarray | None:
    if images is None:
        return None
    if images.dim() != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"SPELL Report: input 'images' must be an IMAGE batch [B, H, W, 3] (got shape "
                         f"{tuple(images.shape)}); connect the VAE Decode output of the SPELL Sampler's latents")
    return images[..., :3].detach().float().cpu().numpy()


def decoded_shields(shield_set, indices: list[int], vae) -> np.ndarray | None:
    """Decode the nearest shields with ``vae`` when the set has no thumbnails."""
    if vae is None:
        return None
    images = vae.decode(shield_set.source.latents(indices))
    return images.reshape(-1, *images.shape[-3:]).float().cpu().numpy()


def shield_thumbnails(shield_set, report, vae=None) -> dict:
    """Nearest-shield index -> image, from the set's thumbnails, else decoded with ``vae``, else none."""
    indices = sorted({o.nearest_shield for o in report.outputs if o.nearest_shield >= 0})
    if shield_set is None or not indices:
        return {}
    if len(shield_set) != report.shield_count:
        LOG.warning("SPELL Report: the shield set has %d shields but the report was made with %d; "
                    "thumbnails may not match", len(shield_set), report.shield_count)
    indices = [k for k in indices if k < len(shield_set)]
    if getattr(shield_set, "thumbnails", None) is not None:
        images = shield_set.thumbnails(torch.tensor(indices, dtype=torch.long))
        images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    else:
        images = decoded_shields(shield_set, indices, vae)
    return {} if images is None else dict(zip(indices, images))


class SpellReportNode:
    DESCRIPTION = ("Draws what SPELL did in its last run: (a) per step, how many samples were corrected and how "
                   "large the correction was relative to the step (SPELL paper Fig. 5); (b) each output beside "
                   "its nearest protected image with the distance, whether it was repelled (Fig. 7), and whether "
                   "the protection came from the sampling loop or from a final t=0 jump (with its size relative to "
                   "the latent: a large jump means the sampler did not follow the in-loop corrections).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("activity_chart", "shield_panel", "summary")
    FUNCTION = "render"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"report": (SPELL_REPORT, {"tooltip": "The 'report' output of SPELL Sampler."})},
            "optional": {
                "images": ("IMAGE", {"tooltip": "The decoded outputs of the same run (VAE Decode of the SPELL "
                                                "Sampler's LATENT), shown in the nearest-shield panel."}),
                "shield_set": (SHIELD_SET, {"tooltip": "The shield set the sampler used; its thumbnails show the "
                                                       "nearest protected image of each output."}),
                "vae": ("VAE", {"tooltip": "Decodes the nearest shields when the shield set has no thumbnails "
                                           "(e.g. made by Latents to Shield Set). Optional."}),
            },
        }

    def render(self, report, images=None, shield_set=None, vae=None):
        if report is None or not hasattr(report, "steps"):
            raise ValueError("SPELL Report: input 'report' holds no SPELL report; connect the 'report' output of "
                             "SPELL Sampler and queue the sampler")
        labels = list(getattr(shield_set, "labels", []) or []) if shield_set is not None else []
        chart = to_image(plots.activity_chart(report))
        panel = to_image(plots.shield_panel(report, image_array(images), shield_thumbnails(shield_set, report, vae),
                                            labels))
        summary = report.summary()
        return {"ui": {"images": preview([chart, panel], "spell_report"), "text": [summary]},
                "result": (chart, panel, summary)}


class DngReportNode:
    DESCRIPTION = ("Draws the DNG trace of the last run: per sample, the posterior p(c- | x_t) that the sample "
                   "is heading for the negative concept and the guidance scale it got, over the steps (DNG "
                   "paper Fig. 5b).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("chart", "summary")
    FUNCTION = "render"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dng_report": (DNG_REPORT, {"tooltip": "The report output of the DNG node; it is "
                                                                    "filled while a sampler runs with that model."})},
                "optional": {"after": ("LATENT", {"tooltip": "Connect the sampler's LATENT output so this report "
                                                             "is drawn after sampling (otherwise it may run first "
                                                             "and show the previous run)."})}}

    def render(self, dng_report, after=None):
        if dng_report is None or not hasattr(dng_report, "posterior") or not hasattr(dng_report, "scale"):
            raise ValueError("DNG Report: input 'dng_report' holds no DNG trace; connect the report output of the "
                             "DNG node")
        chart = to_image(plots.dng_chart(dng_report))
        summary = dng_report.summary() if hasattr(dng_report, "summary") else ""
        return {"ui": {"images": preview([chart], "dng_report"), "text": [summary]}, "result": (chart, summary)}


NODE_CLASS_MAPPINGS = {
    "ShieldedSpellReport": SpellReportNode,
    "ShieldedDngReport": DngReportNode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ShieldedSpellReport": "SPELL Report",
    "ShieldedDngReport": "DNG Report",
}
