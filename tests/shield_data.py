"""Shield sets and float64 truth shared by the shield_db tests (file database, screen, PostgreSQL)."""
from __future__ import annotations

import numpy as np
import torch

from shield_db.database import ShieldDatabase


def make_db(tmp_path, data: np.ndarray, name: str = "db", **txn) -> ShieldDatabase:
    """A database of ``data`` (one commit); ``txn`` sets writer attributes first (e.g. ``index_dim``)."""
    db = ShieldDatabase(tmp_path / name)
    with db.writer(item_shape=data.shape[1:]) as w:
        for key, value in txn.items():
            setattr(w, key, value)
        w.add_batch([f"s{i}" for i in range(len(data))], [f"{i:064x}" for i in range(len(data))], data)
    return db


def brute_within(data: np.ndarray, queries: torch.Tensor, radius: float):
    """``(indices of shields within radius of any query, float64 distances [Q, N])``."""
    z = torch.from_numpy(data.astype(np.float64)).reshape(len(data), -1)
    q = queries.double().reshape(len(queries), -1)
    d = ((q[:, None] - z[None]) ** 2).sum(-1).sqrt()
    return np.nonzero((d <= radius).any(0).numpy())[0], d


def clustered(n: int, shape: tuple, seed: int = 0, clusters: int = 12) -> np.ndarray:
    """fp16 latents of ``shape``: cluster centres + smooth (4x4-block) variation + a little white detail."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, *shape)) * 3
    c, h, w = shape
    low = rng.standard_normal((n, c, h // 4, w // 4)).repeat(4, 2).repeat(4, 3)  # smooth within-cluster variation
    return (centres[rng.integers(0, clusters, n)] + low + 0.05 * rng.standard_normal((n, *shape))).astype(np.float16)


def near_and_far(data: np.ndarray, seed: int = 1):
    """Two queries next to shields and one of isotropic noise (every shield about equally far), with float64
    truth: ``(queries [3, ...], distances [3, N], nearest distances [3], reach)``, where ``reach`` (twice the near
    queries' nearest distance) holds both near queries' nearest shields but not the far one's."""
    shape = data.shape[1:]
    gen = torch.Generator().manual_seed(seed)
    near = torch.from_numpy(data[[1, 500]].astype(np.float32)) + 0.3 * torch.randn(2, *shape, generator=gen)
    q = torch.cat([near, 8.0 * torch.randn(1, *shape, generator=gen)])
    _, d = brute_within(data, q, 0)
    nn = d.min(1).values
    reach = float(2 * nn[:2].max())
    assert nn[2] > reach
    return q, d, nn, reach
