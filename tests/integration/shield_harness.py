"""Real-ComfyUI harness for integration tests: found through COMFYUI_PATH, never copied into the project.

Builds a tiny randomly initialised SD1.5-config UNet (32 channels, context_dim 64) wrapped in a real
``ModelPatcher``, loads this pack the way ComfyUI loads a custom node folder, and exposes the host's
``nodes`` module so tests run the real KSampler / SamplerCustomAdvanced. The boot, the pack loader and the
models live in ``benchmarks/comfy_host.py`` (shared with the benchmarks that run inside ComfyUI).
"""
from __future__ import annotations

import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
if str(PACK_ROOT) not in sys.path:  # run as a script (tests/ui/make_doc_figures.py): after ComfyUI's own modules
    sys.path.append(str(PACK_ROOT))

# One host boot and model builder for the tests and the benchmarks: benchmarks/comfy_host.py.
from benchmarks.comfy_host import (  # noqa: E402
    CONTEXT_DIM,
    PACK_MODULE,
    boot_comfy,
    comfy_path,
    conditioning,
    load_pack,
    pack_submodule,
    sd15_unet_config,
    tiny_unet_config,
)
from benchmarks.comfy_host import random_model as tiny_model  # noqa: E402
from benchmarks.tiny_unet import randomise  # noqa: E402

__all__ = ["CONTEXT_DIM", "PACK_MODULE", "PACK_ROOT", "boot_comfy", "comfy_path", "conditioning", "empty_latent",
           "ksample", "load_pack", "pack_submodule", "randomise", "sd15_unet_config", "tiny_model", "tiny_unet_config"]


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
