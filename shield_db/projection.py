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

import math

import numpy as np
import torch

FEATURE_REL_ERROR = 1e-5
FIT_SAMPLE_ROWS = 8192
SPECTRAL_SAFETY = 1.0 + 1e-9


def gamma(n: int, unit_roundoff: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``."""
    nu = n * unit_roundoff
    if nu >= 0.5:
        raise ValueError(f"gamma_n undefined for n={n}, u={unit_roundoff}")
    return nu / (1 - nu)


def check_feature_bound(dim: int) -> None:
    """The derivation above holds while ``sqrt(3 gamma_{D+2}) + 2^-24 << FEATURE_REL_ERROR``.

    ``2^-23`` more covers the coarse screening features' own rounding (``feature_index.coarse_features``).
    """
    bound = math.sqrt(3 * gamma(dim + 2, 2.0 ** -53)) + 2.0 ** -24 + 2.0 ** -23 + 8 * gamma(dim + 2, 2.0 ** -53)
    if bound > FEATURE_REL_ERROR / 2:
        raise ValueError(f"feature error bound {bound:.2e} too large for D={dim}")


def fit_basis(sample: np.ndarray, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], A [D, k])`` in float64 from a sample ``[n, D]``: top-``k`` PCA directions, ``||A||_2 <= 1``."""
    x = torch.from_numpy(np.asarray(sample, dtype=np.float32).reshape(len(sample), -1))
    n, big_d = x.shape
    check_feature_bound(big_d)
    mu = x.double().mean(0)
    k = max(0, min(int(dim), n - 1, big_d))
    if k == 0:
        return mu.numpy(), np.zeros((big_d, 0))
    torch.manual_seed(seed)
    q = min(k + 10, n, big_d)
    # The directions only need to be good, not exact: exactness rests on ||A||_2 <= 1, enforced in float64.
    _, _, v = torch.svd_lowrank(x - mu.float(), q=q, niter=2)
    basis, _ = torch.linalg.qr(v[:, :k].double())
    spectral = float(torch.linalg.matrix_norm(basis, ord=2)) * SPECTRAL_SAFETY
    return mu.numpy(), (basis / spectral).numpy()


def features(x: np.ndarray, mu: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(f(x) [n, k+1] float32, ||x - mu|| [n] float64)`` for rows ``x [n, D]`` (any float dtype)."""
    xc = torch.from_numpy(np.asarray(x).reshape(len(x), -1).astype(np.float64)) - torch.from_numpy(mu)
    proj = xc @ torch.from_numpy(a)
    norm_sq = xc.square().sum(1)
    residual = (norm_sq - proj.square().sum(1)).clamp_min(0).sqrt()
    feats = torch.cat([proj, residual[:, None]], 1)
    return feats.to(torch.float32).numpy(), norm_sq.sqrt().numpy()


def feature_error(norm: np.ndarray | float) -> np.ndarray | float:
    """Bound on ``||f_stored(x) - f(x)||`` given ``||x - mu||``."""
    return FEATURE_REL_ERROR * norm


def search_radius_sq(radius: float, query_norm: float, max_shield_norm: float,
                     query_feat_sq: float, max_feat_sq: float, feat_dim: int) -> float:
    """A float32 squared radius that FAISS's ``dist < R`` test cannot fail for a true hit.

    ``||f^(q) - f^(z)|| <= r + e_q + e_z``; FAISS evaluates ``||a - b||^2`` directly or as
    ``||a||^2 + ||b||^2 - 2 a.b`` in float32, with error ``<= 2 gamma_{k+3} (||a||^2 + ||b||^2)``; we allow twice that.
    """
    reach = radius + feature_error(query_norm) + feature_error(max_shield_norm)
    slack = 4 * gamma(feat_dim + 5, 2.0 ** -24) * (query_feat_sq + max_feat_sq)
    value = np.float32((reach * reach + slack) * (1 + 1e-6))
    return float(np.nextafter(value, np.float32(np.inf)))
