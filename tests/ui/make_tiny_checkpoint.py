"""Writes a random SD1.5-format checkpoint that ComfyUI's CheckpointLoaderSimple detects and loads.

Run with ComfyUI's Python: ``COMFYUI_PATH=/path/to/ComfyUI python tests/ui/make_tiny_checkpoint.py OUT.safetensors``.

ComfyUI recognises SD1.5 by the UNet's model_channels (320) and context width (768), and builds the full
CLIP-L text encoder and SD VAE whatever the checkpoint holds, so only the UNet can be made small: one level,
one residual block, one transformer block (about 21M parameters). CLIP and VAE keep their real shapes with
random weights. Everything is stored in fp16 (about 0.4 GB); images are noise, which is all the UI tests need.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the repository: the shared tiny-model helpers
from benchmarks import comfy_host  # noqa: E402
from benchmarks.tiny_unet import randomise, tiny_unet_config  # noqa: E402

SEED = 0


def unet_config() -> dict:
    """SD1.5 as ComfyUI detects it (320 channels, context 768), cut to one level and one block."""
    return tiny_unet_config(model_channels=320, num_res_blocks=[1], transformer_depth=[1],
                            transformer_depth_output=[1, 1], channel_mult=[1], context_dim=768, num_heads=8)


def build(out: Path):
    comfy_host.boot_comfy()   # COMFYUI_PATH's ComfyUI first on the path, CPU mode
    import torch
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    gen = torch.Generator().manual_seed(SEED)
    config = comfy.supported_models.SD15(unet_config())
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomise(model.diffusion_model, gen, output_layer="out.2")

    clip = comfy.sd.CLIP(config.clip_target(), embedding_directory=None)
    randomise(clip.cond_stage_model, gen)
    vae_model = autoencoder.AutoencoderKL(
        ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
        embed_dim=4)
    randomise(vae_model, gen)

    parts = {"clip_state_dict": clip.get_sd(), "vae_state_dict": vae_model.state_dict()}
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:   # ComfyUI >= 0.4
        parts["unet_state_dict"] = model.diffusion_model.state_dict()
    sd = model.state_dict_for_saving(**parts)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    comfy.utils.save_torch_file(sd, str(tmp), metadata={"note": "random weights, UI tests only"})
    tmp.replace(out)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
