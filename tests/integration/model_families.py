"""Tiny randomly initialised models of five families, built from the HOST's own classes, for integration tests.

Each family is a ``comfy.supported_models`` config (SD15, SDXL, SD3, Flux, WAN21_T2V) with a unet config shrunk
to a few thousand parameters, instantiated through the config's own ``get_model`` (so the host's model_base,
model_sampling, latent format and extra_conds are the real ones) and wrapped in a real ``ModelPatcher`` on CPU.
``conditioning`` builds a CONDITIONING list of the shape the family's text encoder would return (pooled outputs
where the family needs them; Flux takes its guidance from FluxGuidance or the default 3.5), ``empty_latent`` a
LATENT of the family's channels (WAN: 5-D ``[B, C, T, H, W]``). Works on ComfyUI 0.3.64 and 0.33.0.

    nodes = shield_harness.boot_comfy()
    family = model_families.FAMILIES["flux"]
    model = family.model(seed=0)
    latent = family.empty_latent(batch=2)
    out = nodes.KSampler().sample(model, 0, 4, family.cfg, "euler", family.scheduler,
                                  family.conditioning(1), family.conditioning(2), latent)[0]
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from shield_harness import CONTEXT_DIM, randomise, tiny_unet_config  # the shared tiny UNet (benchmarks/tiny_unet.py)

POOLED_DIM = 32    # pooled-text width where a family uses one
SDXL_ADM_TIME = 6 * 256  # SDXL's six size/crop timestep embeddings (model_base.SDXL.encode_adm)


def sd15_config() -> dict:
    return tiny_unet_config()


def sdxl_config() -> dict:
    return tiny_unet_config(use_linear_in_transformer=True, num_classes="sequential",
                        adm_in_channels=POOLED_DIM + SDXL_ADM_TIME)


def sd3_config() -> dict:
    """MMDiT: hidden size 64 * depth, heads = depth; pos-embed table large enough for a 2x hires pass."""
    return {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
            "adm_in_channels": POOLED_DIM, "pos_embed_scaling_factor": None, "pos_embed_max_size": 16,
            "num_patches": 256, "x_block_self_attn_layers": [],
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": CONTEXT_DIM, "out_features": 128}}}


def flux_config(host_fields: set[str]) -> dict:
    cfg = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
           "vec_in_dim": POOLED_DIM, "context_in_dim": CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 2.0,
           "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000,
           "patch_size": 2, "qkv_bias": True}
    if "txt_ids_dims" in host_fields:  # newer hosts: a required field, [] for Flux.1
        cfg["txt_ids_dims"] = []
    return cfg


def wan21_config() -> dict:
    """WAN 2.1 t2v: dim 64 with 2 heads (head dim 32, the rope split [12, 10, 10])."""
    return {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 2,
            "num_layers": 1, "in_dim": 16, "out_dim": 16, "text_dim": CONTEXT_DIM, "patch_size": (1, 2, 2),
            "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: how to build its tiny model, conditioning and latents, and its usual sampler settings."""
    name: str
    config_class: str          # attribute of comfy.supported_models
    unet_config: Callable[[], dict]
    channels: int
    pooled: bool               # conditioning carries "pooled_output"
    frames: int | None         # latent frames for video families (5-D latents), None for images
    output_layer: str          # parameter name prefix of the final projection (scaled down)
    cfg: float                 # the cfg a user would pick (Flux: 1 with FluxGuidance)
    scheduler: str = "normal"
    is_flow: bool = False

    def model(self, seed: int = 0):
        """A randomly initialised model of this family in a real ModelPatcher (CPU, fp32)."""
        import torch
        import comfy.model_management
        import comfy.model_patcher
        import comfy.supported_models

        torch.manual_seed(seed)
        config_class = getattr(comfy.supported_models, self.config_class)
        unet_config = self.unet_config()
        if self.name == "flux":
            import comfy.ldm.flux.model as flux_model
            unet_config = flux_config({f.name for f in dataclasses.fields(flux_model.FluxParams)})
        config = config_class(unet_config)
        config.unet_config.update(unet_config)  # the family's unet_extra_config (e.g. head width 64) is for full size
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({}, device=torch.device("cpu"))
        model.diffusion_model.to(torch.float32)
        randomise(model.diffusion_model, torch.Generator().manual_seed(seed), self.output_layer)
        return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                                offload_device=torch.device("cpu"))

    def conditioning(self, seed: int, tokens: int = 8, guidance: float | None = None):
        """A CONDITIONING list of the shape this family's text encoder returns (random values)."""
        import torch
        gen = torch.Generator().manual_seed(seed)
        extra = {}
        if self.pooled:
            extra["pooled_output"] = torch.randn(1, POOLED_DIM, generator=gen)
        if guidance is not None:
            extra["guidance"] = guidance
        return [[torch.randn(1, tokens, CONTEXT_DIM, generator=gen), extra]]

    def latent_shape(self, batch: int, size: int = 32) -> tuple[int, ...]:
        """Shape of an empty latent for a ``size`` x ``size`` image (WAN: ``frames`` latent frames)."""
        side = size // 8
        if self.frames is not None:
            return (batch, self.channels, self.frames, side, side)
        return (batch, self.channels, side, side)

    def empty_latent(self, batch: int, size: int = 32) -> dict:
        import torch
        return {"samples": torch.zeros(self.latent_shape(batch, size))}

    def random_latent(self, batch: int, seed: int, size: int = 32, scale: float = 1.0) -> dict:
        """A LATENT of plausible content (for img2img / inpaint inputs and shields)."""
        import torch
        gen = torch.Generator().manual_seed(seed)
        return {"samples": torch.randn(self.latent_shape(batch, size), generator=gen) * scale}


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", "SD15", sd15_config, channels=4, pooled=False, frames=None, output_layer="out.2",
                   cfg=5.0),
    "sdxl": Family("sdxl", "SDXL", sdxl_config, channels=4, pooled=True, frames=None, output_layer="out.2",
                   cfg=5.0),
    "sd3": Family("sd3", "SD3", sd3_config, channels=16, pooled=True, frames=None,
                  output_layer="final_layer.linear", cfg=4.0, scheduler="simple", is_flow=True),
    "flux": Family("flux", "Flux", lambda: {}, channels=16, pooled=True, frames=None,
                   output_layer="final_layer.linear", cfg=1.0, scheduler="simple", is_flow=True),
    "wan21": Family("wan21", "WAN21_T2V", wan21_config, channels=16, pooled=False, frames=3,
                    output_layer="head.head", cfg=5.0, scheduler="simple", is_flow=True),
}

IMAGE_FAMILIES = ("sd15", "sdxl", "sd3", "flux")


def ksample(nodes, family: Family, model, latent: dict, seed: int = 0, steps: int = 4, denoise: float = 1.0,
            sampler: str = "euler", positive=None, negative=None) -> dict:
    """The host's real KSampler with the family's usual cfg and scheduler; returns the LATENT dict."""
    positive = positive if positive is not None else family.conditioning(1)
    negative = negative if negative is not None else family.conditioning(2)
    return nodes.KSampler().sample(model, seed, steps, family.cfg, sampler, family.scheduler, positive, negative,
                                   latent, denoise=denoise)[0]
