"""Shield sets resized for another pass size (a hires pass): bilinear, per frame, in memory.

A shield set is compared at the size of the latent being sampled; a set stored at another height/width is resized
once per run (antialiased when shrinking). Channels and frames are never resampled: a mismatch there means another
model family, and the error names it.
"""
from __future__ import annotations

import torch

# A set larger than this is not resampled in memory (hires passes): the user loads it at the new size instead.
MAX_RESAMPLED_SHIELDS = 4096
RESAMPLE_CHUNK = 256


def resample_latents(latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of latents ``[K, C, H, W]`` or ``[K, C, T, H, W]`` to ``size = (H', W')`` per frame.

    Antialiased when shrinking, so a shield compared at a smaller size is its low-pass, not an aliased sample.
    """
    if latents.dim() not in (4, 5):
        raise ValueError(f"resample_latents needs [K, C, H, W] or [K, C, T, H, W], got shape {tuple(latents.shape)}")
    if tuple(latents.shape[-2:]) == tuple(size):
        return latents.float()
    lead = latents.shape[:-2]
    flat = latents.float().reshape(-1, 1, *latents.shape[-2:])
    shrink = size[0] < latents.shape[-2] or size[1] < latents.shape[-1]
    out = torch.cat([torch.nn.functional.interpolate(flat[s:s + RESAMPLE_CHUNK * 16], size=size, mode="bilinear",
                                                     align_corners=False, antialias=shrink)
                     for s in range(0, flat.shape[0], RESAMPLE_CHUNK * 16)])
    return out.reshape(*lead, *size)


def resized_latents(source, item_shape: tuple) -> torch.Tensor:
    """Every shield of ``source`` (LATENT space) resized to ``item_shape``'s height/width, float32 on the CPU.

    Raises ValueError when channels or frames differ (those cannot be resampled meaningfully) or when the set
    is too large to hold a resized copy.
    """
    have, want = tuple(source.item_shape), tuple(item_shape)
    if len(have) != len(want) or have[:-2] != want[:-2]:
        raise ValueError(resample_mismatch(have, want))
    if len(source) > MAX_RESAMPLED_SHIELDS:
        raise ValueError(f"{len(source)} shields are too many to resize in memory (limit {MAX_RESAMPLED_SHIELDS})")
    return resample_latents(all_latents(source), want[-2:])


def resample_mismatch(have: tuple, want: tuple) -> str:
    """Name the dimension that differs between shields ``have`` and latents ``want`` (not width/height)."""
    if len(have) != len(want):
        kinds = {3: "image latents (C x H x W)", 4: "video latents (C x T x H x W)"}
        return (f"shields are {kinds.get(len(have), f'{len(have)}-D')} but the sampled latent is "
                f"{kinds.get(len(want), f'{len(want)}-D')}")
    if have[0] != want[0]:
        return f"shields have {have[0]} latent channels but the sampled latent has {want[0]} (another model family)"
    return f"shields have {have[1]} latent frames but the sampled latent has {want[1]} (C x T x H x W)"


def all_latents(source) -> torch.Tensor:
    """Every shield of a source as one float32 tensor on the CPU, read ``RESAMPLE_CHUNK`` at a time."""
    chunks = [source.latents(list(range(s, min(s + RESAMPLE_CHUNK, len(source)))))
              for s in range(0, len(source), RESAMPLE_CHUNK)]
    return torch.cat(chunks).float() if chunks else torch.zeros(0, *source.item_shape)
