"""What the cache needs to know about a ComfyUI VAE, without calling it: fingerprint and latent shape."""
from __future__ import annotations

import hashlib
import weakref

import numpy as np
import torch

_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vae_fingerprint(vae) -> str:
    """sha256 of the VAE's class, latent channels and every parameter's name, shape, dtype and bytes (no VAE call).

    Every weight is hashed: two VAEs differing in a single value get different caches. Cost ~0.2-0.5 s per
    100 M parameters on a CPU (``BENCHMARKS.md``), once per loaded VAE object.
    """
    if vae in _FINGERPRINTS:
        return _FINGERPRINTS[vae]
    digest = hashlib.sha256(f"{type(vae.first_stage_model).__name__}:{vae.latent_channels}".encode())
    for name, tensor in sorted(vae.first_stage_model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor_bytes(tensor))
    _FINGERPRINTS[vae] = digest.hexdigest()[:32]
    return _FINGERPRINTS[vae]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor of any dtype (bf16 and fp8 included), on the CPU."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def latent_shape(vae, width: int, height: int, node: str = "Shield Set Loader") -> tuple:
    """``(C, height / f, width / f)`` of an image VAE with spatial factor ``f``."""
    if getattr(vae, "latent_dim", 2) != 2:
        raise ValueError(f"{node}: input 'vae' is not an image VAE (latent_dim {vae.latent_dim}); connect the VAE "
                         f"of an image model")
    ratio = vae.spacial_compression_encode()
    if width % ratio or height % ratio:
        raise ValueError(f"{node}: width {width} and height {height} must be multiples of the VAE's factor {ratio}")
    return (vae.latent_channels, height // ratio, width // ratio)


def vae_encoder(vae):
    """``uint8 [B, H, W, 3] -> float32 [B, C, h, w]`` through ComfyUI's ``VAE.encode`` (as the VAE Encode node)."""
    def encode(pixels: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(pixels).float() / 255.0
        with torch.inference_mode():
            return vae.encode(images).detach().float().cpu().numpy()
    return encode
