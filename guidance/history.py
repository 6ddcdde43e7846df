"""Named in-process histories of earlier outputs (the paper's "previous batches"), shared across runs.

Host-free, so the ComfyUI nodes and the WebUI extension keep their histories the same way."""
from __future__ import annotations

import logging
import threading

import torch

from .shields import ShieldSource, TensorShields

LOG = logging.getLogger("shielded_sampling")
DEFAULT_CAP = 256

_LOCK = threading.Lock()
_HISTORIES: dict[str, list[torch.Tensor]] = {}
_VERSIONS: dict[str, int] = {}


def _bump(name: str):
    _VERSIONS[name] = _VERSIONS.get(name, 0) + 1


def add(name: str, latents: torch.Tensor, cap: int = DEFAULT_CAP) -> int:
    """Append final LATENT-space outputs to history ``name``, keeping the newest ``cap``; returns its size."""
    with _LOCK:
        items = _HISTORIES.setdefault(name, [])
        items.extend(latents.detach().float().cpu().unbind(0))
        if cap > 0 and len(items) > cap:
            del items[:len(items) - cap]
        _bump(name)
        return len(items)


def source(name: str, item_shape: tuple) -> ShieldSource | None:
    """The entries of history ``name`` whose shape matches ``item_shape`` as a shield source, or None."""
    with _LOCK:
        items = [t for t in _HISTORIES.get(name, []) if tuple(t.shape) == tuple(item_shape)]
    return TensorShields(torch.stack(items)) if items else None


def size(name: str) -> int:
    with _LOCK:
        return len(_HISTORIES.get(name, []))


def clear(name: str = "") -> int:
    """Forget history ``name`` (all histories when empty); returns how many latents were dropped."""
    with _LOCK:
        for key in ([name] if name else list(_HISTORIES)):
            _bump(key)
        if name:
            return len(_HISTORIES.pop(name, []))
        dropped = sum(len(v) for v in _HISTORIES.values())
        _HISTORIES.clear()
        return dropped


def version(name: str) -> int:
    """Changes whenever history ``name`` gains or loses latents (drives ComfyUI's re-execution)."""
    with _LOCK:
        return _VERSIONS.get(name, 0)

