"""Random models for the host tests and benchmarks, host-free: the SD1.5-style tiny UNet config and the weight
initialiser.

The hosts (ComfyUI, Forge, reForge) build their layers uninitialised; ``benchmarks/comfy_host.py``, the test
harnesses (``tests/integration``, ``tests/webui``) and the stand-in model scripts (``tests/ui``) fill them with
:func:`randomise`.
"""
from __future__ import annotations

CONTEXT_DIM = 64   # text-context width of the tiny models


def tiny_unet_config(**overrides) -> dict:
    """An SD1.5-config UNet of two levels, 32 channels and one transformer block per level, with ``overrides``."""
    cfg = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": CONTEXT_DIM, "use_temporal_resblock": False, "use_temporal_attention": False,
        "num_heads": 2, "num_head_channels": -1,
    }
    cfg.update(overrides)
    return cfg


def _is_norm(name: str) -> bool:
    return "norm" in name or "ln_" in name or name.endswith(".scale")


def randomise(module, gen, output_layer: str | None = None):
    """Small random weights (``N(0, 1/fan_in)``), unit norms, zero biases; ``output_layer``'s weight x0.05 so the
    prediction stays near unit scale; MMDiT's ``torch.empty`` ``pos_embed`` buffer filled too."""
    import torch
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.numel() == 0:
                continue
            if name.endswith("bias"):
                param.zero_()
            elif _is_norm(name):
                param.fill_(1.0)
            else:
                fan_in = max(1, param[0].numel()) if param.dim() > 1 else 1
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in ** 0.5)
            if output_layer is not None and name.startswith(output_layer) and name.endswith("weight"):
                param.mul_(0.05)
        for name, buf in module.named_buffers():
            if name.endswith("pos_embed") and buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.02)
