"""Real-ComfyUI harness for integration tests: found through COMFYUI_PATH, never copied into the project.

Builds a tiny randomly initialised SD1.5-config UNet (32 channels, context_dim 64) wrapped in a real
``ModelPatcher``, loads this pack the way ComfyUI loads a custom node folder, and exposes the host's
``nodes`` module so tests run the real KSampler / SamplerCustomAdvanced.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_MODULE = "comfyui_shielded_sampling"

if str(PACK_ROOT / "tests") not in sys.path:  # the host-free tiny-model helpers shared by every host test
    sys.path.insert(0, str(PACK_ROOT / "tests"))
from tiny_unet import CONTEXT_DIM, randomise, tiny_unet_config  # noqa: E402,F401


def comfy_path() -> Path | None:
    path = os.environ.get("COMFYUI_PATH")
    return Path(path) if path and (Path(path) / "comfy").is_dir() else None


def boot_comfy():
    """Import ComfyUI from COMFYUI_PATH in CPU mode; returns its ``nodes`` module."""
    root = comfy_path()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (selects the CPU device)
    import nodes
    return nodes


def load_pack():
    """Import the pack from its folder as ComfyUI does for ``custom_nodes/<folder>``."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


def pack_submodule(name: str):
    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.{name}")


def sd15_unet_config() -> dict:
    """The real SD1.5 UNet shape (320 channels, context 768): random weights, realistic cost."""
    cfg = tiny_unet_config()
    cfg.update({"model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                "context_dim": 768, "num_heads": 8})
    return cfg


def tiny_model(seed: int = 0, unet_config: dict | None = None):
    """A randomly initialised SD1.5-config model in a real ModelPatcher (CPU, fp32)."""
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    torch.manual_seed(seed)
    config = comfy.supported_models.SD15(unet_config or tiny_unet_config())
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.to(torch.float32)
    randomise(model.diffusion_model, torch.Generator().manual_seed(seed), output_layer="out.2")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=torch.device("cpu"))


def conditioning(seed: int, tokens: int = 8, width: int = CONTEXT_DIM):
    """A CONDITIONING list as CLIPTextEncode returns it, with random context of the model's width."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=gen), {}]]


def empty_latent(batch: int, size: int = 32):
    import torch
    return {"samples": torch.zeros(batch, 4, size // 8, size // 8)}


def ksample(nodes, model, latent, seed=0, steps=10, cfg=5.0, sampler="euler", scheduler="normal",
            positive=None, negative=None, denoise=1.0):
    """Run the host's real KSampler node; returns the LATENT dict."""
    positive = positive if positive is not None else conditioning(1)
    negative = negative if negative is not None else conditioning(2)
    return nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                   denoise=denoise)[0]
