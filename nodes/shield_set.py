"""The SHIELD_SET type: a searchable set of protected latents, stored in LATENT (VAE) space."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..guidance.shields import ShieldSource, TensorShields

SHIELD_SET = "SHIELD_SET"


@dataclass
class ShieldSet:
    """What SPELL repels from. ``source`` is a ``guidance.shields.ShieldSource`` in LATENT space.

    The correction asks ``source.within(queries, radius)`` for neighbours; it never reads every shield,
    so a source may be an index over millions of latents on disk (``shield_db``).
    """

    source: ShieldSource
    name: str = "shields"
    thumbnails: Callable[[torch.Tensor], torch.Tensor] | None = None  # indices -> uint8 [N, h, w, 3]
    labels: list = field(default_factory=list)                             # optional per-shield names

    @property
    def item_shape(self) -> tuple:
        return tuple(self.source.item_shape)

    def __len__(self) -> int:
        return len(self.source)

    @classmethod
    def from_latents(cls, samples: torch.Tensor, name: str = "latents") -> ShieldSet:
        return cls(TensorShields(samples.detach().float().cpu()), name=name)

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.item_shape)
        return f"{self.name}: {len(self)} shields of {shape}"
