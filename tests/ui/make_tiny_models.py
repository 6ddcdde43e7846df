"""Writes random Flux and WAN 2.1 model files that ComfyUI's UNETLoader, CLIPLoader/DualCLIPLoader and VAELoader
detect and load, for the UI test runs of the Flux and WAN example workflows.

Run with ComfyUI's Python: ``COMFYUI_PATH=/path/to/ComfyUI python tests/ui/make_tiny_models.py MODELS_DIR``.
Writes (names are what tests/integration/test_ui_browser.py maps the workflows' real file names to):

* ``diffusion_models/shielded_tiny_flux.safetensors``: Flux with one double block and no single block. The width is
  the one the host reads back from the weights (0.33.0: 128; 0.3.64 fixes hidden_size 3072 whatever the file says).
* ``diffusion_models/shielded_tiny_wan21.safetensors``: WAN 2.1 t2v, dim 128 (one head), one block.
* ``text_encoders/shielded_tiny_clip_l.safetensors``: a full-size random CLIP-L.
* ``vae/shielded_tiny_flux_vae.safetensors`` and ``vae/shielded_tiny_wan21_vae.safetensors``: the hosts' Flux
  (16-channel AutoencoderKL) and WAN 2.1 VAEs at their real, fixed sizes, random weights.

Why the text encoder is CLIP-L and not T5: ComfyUI builds T5-XXL (Flux) and UMT5-XXL (WAN) from fixed JSON configs
(4096 wide, 24 layers, ~5 B parameters) whatever the file holds, and pads T5 prompts to 256 tokens, so no tiny T5
file exists for DualCLIPLoader type 'flux' or CLIPLoader type 'wan'. The UI test therefore loads this CLIP-L with
type 'sd3', which pads its output to T5's 4096-wide context (pooled 2048), and the tiny models are built for that.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the repository: the shared tiny-model helpers
from benchmarks import comfy_host  # noqa: E402
from benchmarks.tiny_unet import randomise  # noqa: E402

SEED = 0
FLUX = "diffusion_models/shielded_tiny_flux.safetensors"
WAN = "diffusion_models/shielded_tiny_wan21.safetensors"
CLIP_L = "text_encoders/shielded_tiny_clip_l.safetensors"
FLUX_VAE = "vae/shielded_tiny_flux_vae.safetensors"
WAN_VAE = "vae/shielded_tiny_wan21_vae.safetensors"
T5_CONTEXT = 4096     # what CLIP-L loaded as type 'sd3' pads to (T5's width)
SD3_POOLED = 2048     # CLIP-L pooled 768 + an empty CLIP-G pooled 1280
TEXT_ENCODER_TYPE = "sd3"
# The real files the example workflows name (tests/ui/workflow_specs.mjs) -> the tiny file the UI test loads instead.
TINY_FOR_REAL = {
    "flux1-dev.safetensors": FLUX, "clip_l.safetensors": CLIP_L, "t5xxl_fp16.safetensors": CLIP_L,
    "ae.safetensors": FLUX_VAE, "wan2.1_t2v_1.3B_fp16.safetensors": WAN,
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": CLIP_L, "wan_2.1_vae.safetensors": WAN_VAE,
}


def flux_unet_config(hidden: int, host_fields: set[str]) -> dict:
    cfg = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
           "vec_in_dim": SD3_POOLED, "context_in_dim": T5_CONTEXT, "hidden_size": hidden, "mlp_ratio": 4.0,
           "num_heads": hidden // 128, "depth": 1, "depth_single_blocks": 0, "axes_dim": [16, 56, 56],
           "theta": 10000, "patch_size": 2, "qkv_bias": True}
    if "txt_ids_dims" in host_fields:
        cfg["txt_ids_dims"] = []
    return cfg


def wan_unet_config() -> dict:
    return {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "ffn_dim": 256, "num_heads": 1,
            "num_layers": 1, "in_dim": 16, "out_dim": 16, "text_dim": T5_CONTEXT, "patch_size": (1, 2, 2),
            "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}


def diffusion_state_dict(config_class: str, unet_config: dict, output_layer: str, gen) -> dict:
    """A random diffusion model of a host config, as UNETLoader reads it (no prefix)."""
    import torch
    import comfy.supported_models
    config = getattr(comfy.supported_models, config_class)(unet_config)
    config.unet_config.update(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomise(model.diffusion_model, gen)
    with torch.no_grad():
        for name, param in model.diffusion_model.named_parameters():
            if name.startswith(output_layer) and name.endswith("weight"):
                param.mul_(0.05)     # prediction near unit scale
    return model.diffusion_model.state_dict()


def flux_state_dict(gen) -> dict:
    """Flux at the width the host reads back: build small, ask the host's detection, rebuild if it differs."""
    import dataclasses
    import comfy.ldm.flux.model as flux_model
    import comfy.model_detection
    fields = {f.name for f in dataclasses.fields(flux_model.FluxParams)}
    hidden = 128
    sd = diffusion_state_dict("Flux", flux_unet_config(hidden, fields), "final_layer.linear", gen)
    detected = comfy.model_detection.detect_unet_config(sd, "")["hidden_size"]
    if detected != hidden:
        sd = diffusion_state_dict("Flux", flux_unet_config(detected, fields), "final_layer.linear", gen)
    return sd


def clip_l_state_dict(gen) -> dict:
    """CLIP-L as a text-encoder file (keys text_model.*): the host builds it full size from its own config."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=None)
    randomise(clip.cond_stage_model, gen)
    prefix = "clip_l.transformer."
    return {k[len(prefix):]: v for k, v in clip.cond_stage_model.state_dict().items() if k.startswith(prefix)}


def flux_vae_state_dict(gen) -> dict:
    import comfy.ldm.models.autoencoder as autoencoder
    vae = autoencoder.AutoencoderKL(
        ddconfig={"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
        embed_dim=16)
    randomise(vae, gen)
    return {k: v for k, v in vae.state_dict().items() if "quant_conv" not in k}   # ae.safetensors has none


def wan_vae_state_dict(gen) -> dict:
    import comfy.ldm.wan.vae as wan_vae
    vae = wan_vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                         temperal_downsample=[False, True, True], dropout=0.0)
    randomise(vae, gen)
    return vae.state_dict()


def save(sd: dict, out: Path):
    import comfy.utils
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    comfy.utils.save_torch_file(sd, str(tmp), metadata={"note": "random weights, UI tests only"})
    tmp.replace(out)


def build(models: Path):
    comfy_host.boot_comfy()   # COMFYUI_PATH's ComfyUI first on the path, CPU mode
    import torch
    gen = torch.Generator().manual_seed(SEED)
    makers = {FLUX: flux_state_dict, WAN: lambda g: diffusion_state_dict("WAN21_T2V", wan_unet_config(), "head.head", g),
              CLIP_L: clip_l_state_dict, FLUX_VAE: flux_vae_state_dict, WAN_VAE: wan_vae_state_dict}
    for name, make in makers.items():
        if not (models / name).exists():
            save(make(gen), models / name)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
