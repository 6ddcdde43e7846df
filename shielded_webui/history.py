"""Earlier outputs of this WebUI process (the paper's "previous batches"), kept per name across generations."""
from __future__ import annotations

import threading

import torch

from guidance.shields import TensorShields

_LOCK = threading.Lock()
_HISTORIES: dict[str, list[torch.Tensor]] = {}


def add(name: str, latents: torch.Tensor, cap: int) -> int:
    """Append final latents (VAE latent space, ``[B, C, H, W]``) to history ``name``; keep the newest ``cap``."""
    with _LOCK:
        items = _HISTORIES.setdefault(name, [])
        items.extend(latents.detach().float().cpu().unbind(0))
        if cap > 0 and len(items) > cap:
            del items[:len(items) - cap]
        return len(items)


def source(name: str, item_shape: tuple):
    """History ``name``'s latents of shape ``item_shape`` as a shield source, or None (other sizes are kept)."""
    with _LOCK:
        items = [t for t in _HISTORIES.get(name, []) if tuple(t.shape) == tuple(item_shape)]
    return TensorShields(torch.stack(items)) if items else None


def size(name: str) -> int:
    with _LOCK:
        return len(_HISTORIES.get(name, []))


def clear(name: str = "") -> int:
    """Forget history ``name`` (every history when empty); returns how many latents were dropped."""
    with _LOCK:
        if name:
            return len(_HISTORIES.pop(name, []))
        dropped = sum(len(v) for v in _HISTORIES.values())
        _HISTORIES.clear()
        return dropped
