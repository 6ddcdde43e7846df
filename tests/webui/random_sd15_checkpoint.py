"""A random-weight, full-size SD1.5 checkpoint (original single-file layout, fp16 safetensors) for booting a Forge
WebUI server offline: the server only recognises real SD1.5 key sets and shapes, and no model hub is reachable.

The key names and shapes come from Forge's own classes (``IntegratedUNet2DConditionModel``,
``IntegratedAutoencoderKL`` with the VAE config Forge ships, ``CLIPTextModel`` with the text-encoder config Forge
ships), built on the meta device, so nothing is allocated but the written tensors. The values are seeded and
deterministic (the same bytes on every machine). Run with a Forge venv, from anywhere:

    WEBUI_PATH=../shared/hosts/forge-2025-06 python tests/webui/random_sd15_checkpoint.py OUT.safetensors
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

SEED = 1515
SD15_UNET = dict(in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768,
                 use_linear_in_transformer=False)
SD15_REPO = Path("backend") / "huggingface" / "runwayml" / "stable-diffusion-v1-5"


def shapes(root: Path) -> dict[str, tuple]:
    """``{key: shape}`` of an original-layout SD1.5 checkpoint, from the Forge tree at ``root``."""
    sys.path[:0] = [str(root), str(root / "packages_3rdparty")]
    sys.argv = sys.argv[:1] + ["--always-cpu", "--skip-torch-cuda-test"]
    from modules_forge import initialization
    initialization.initialize_forge()      # Forge's backend reads its device flags on import
    from transformers import CLIPTextConfig, CLIPTextModel
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    out = {}
    with torch.device("meta"):
        parts = {
            "model.diffusion_model.": IntegratedUNet2DConditionModel(**SD15_UNET),
            "first_stage_model.": IntegratedAutoencoderKL.from_config(
                IntegratedAutoencoderKL.load_config(str(root / SD15_REPO / "vae"))),
            "cond_stage_model.transformer.": CLIPTextModel(
                CLIPTextConfig.from_pretrained(str(root / SD15_REPO / "text_encoder"))),
        }
    for prefix, module in parts.items():
        for name, tensor in module.state_dict().items():
            out[prefix + name] = tuple(tensor.shape)
    return out


def value(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Norm scales 1, biases 0, the rest N(0, 1 / fan_in) (position ids as the CLIP model expects)."""
    if name.endswith("position_ids"):
        return torch.arange(shape[-1]).reshape(shape)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if "norm" in name and len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    fan_in = max(1, int(torch.tensor(shape[1:]).prod().item())) if len(shape) > 1 else shape[0]
    return (torch.randn(shape, generator=gen) / fan_in ** 0.5).to(torch.float16)


def build(root: Path, out: Path):
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(SEED)
    tensors = {name: value(name, shape, gen) for name, shape in sorted(shapes(root).items())}
    tmp = out.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt", "note": "random weights, for tests only"})
    os.replace(tmp, out)


if __name__ == "__main__":
    build(Path(os.environ["WEBUI_PATH"]).resolve(), Path(sys.argv[1]))
