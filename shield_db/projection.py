"""A distance-non-increasing feature map, so a range query on features returns a superset of the true hits.

With a centre ``mu`` and a matrix ``A`` [D, d] of spectral norm ``||A||_2 <= 1`` (a scaled PCA basis),

    f(x) = [ A^T (x - mu),  n(x - mu) ],      n(v)^2 = ||v||^2 - ||A^T v||^2 = v^T (I - A A^T) v.

``I - A A^T`` is positive semi-definite, so ``n`` is a seminorm and ``|n(a) - n(b)| <= n(a - b)``. Hence

    ||f(q) - f(z)||^2 = ||A^T (q - z)||^2 + (n(q - mu) - n(z - mu))^2 <= ||A^T (q - z)||^2 + n(q - z)^2 = ||q - z||^2,

and every shield with ``||q - z|| <= r`` has ``||f(q) - f(z)|| <= r``: nothing is missed. The extra coordinate
``n`` (the norm of the part PCA does not see) prunes shields whose residual energy differs from the query's.

Rounding: features are computed in float64 from the exactly representable inputs (fp16 shields, float32
queries) and stored as float32. Matmul error ``<= sqrt(d) gamma_{D+2} ||v||`` (float64, ~4e-12 ||v|| at
D = 4096), ``n`` error ``<= sqrt(|err(n^2)|) <= sqrt(3 gamma_{D+2}) ||v||`` (~1.2e-6 ||v||), float32 storage
``<= 2^-24 ||f||``; :data:`FEATURE_REL_ERROR` bounds the sum with a wide margin, for D up to 10^6.
"""
from __future__ import annotations

import numpy as np
import torch

from .guidance_math import feature_screen as _map

FeatureScreen = _map.FeatureScreen
FEATURE_REL_ERROR = _map.FEATURE_REL_ERROR
FIT_SAMPLE_ROWS = _map.FIT_SAMPLE_ROWS
gamma = _map.gamma
check_feature_bound = _map.check_feature_bound


def fit_basis(sample: np.ndarray, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], A [D, k])`` in float64 from a sample ``[n, D]``: top-``k`` PCA directions, ``||A||_2 <= 1``."""
    mu, a = _map.fit_map(torch.from_numpy(np.asarray(sample, dtype=np.float32)), dim, seed)
    return mu.numpy(), a.numpy()


def features(x: np.ndarray, mu: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(f(x) [n, k+1] float32, ||x - mu|| [n] float64)`` for rows ``x [n, D]`` (any float dtype)."""
    feats, norms = _map.map_features(torch.from_numpy(np.asarray(x)), torch.from_numpy(mu), torch.from_numpy(a))
    return feats.numpy(), norms.numpy()


def feature_error(norm: np.ndarray | float) -> np.ndarray | float:
    """Bound on ``||f_stored(x) - f(x)||`` given ``||x - mu||``."""
    return FEATURE_REL_ERROR * norm


def search_radius_sq(radius: float, query_norm: float, max_shield_norm: float,
                     query_feat_sq: float, max_feat_sq: float, feat_dim: int) -> float:
    """A float32 squared radius that FAISS's ``dist < R`` test cannot fail for a true hit.

    ``||f^(q) - f^(z)|| <= r + e_q + e_z``; FAISS evaluates ``||a - b||^2`` directly or as
    ``||a||^2 + ||b||^2 - 2 a.b`` in float32, with error ``<= 2 gamma_{k+3} (||a||^2 + ||b||^2)``; we allow twice that.
    Elementwise over arrays of radii and query norms (float64 arithmetic, the same value as one call per query).
    """
    reach = radius + feature_error(query_norm) + feature_error(max_shield_norm)
    slack = 4 * gamma(feat_dim + 5, 2.0 ** -24) * (query_feat_sq + max_feat_sq)
    value = np.asarray((reach * reach + slack) * (1 + 1e-6), np.float64).astype(np.float32)
    rounded = np.nextafter(value, np.float32(np.inf))
    return float(rounded) if rounded.ndim == 0 else rounded
