"""Diversity and fidelity metrics for benchmarks, computed by maintained libraries.

- Vendi score (Friedman & Dieng 2023): ``exp(entropy of the eigenvalues of K / n)`` for a similarity kernel
  ``K`` with unit diagonal; here the cosine kernel of feature vectors (``vendi_score.vendi.score_X``, the
  reference implementation, package ``vendi-score``). 1 for identical samples, ``n`` for orthogonal ones.
- Improved precision / recall with k-NN manifolds (Kynkäänniemi et al. 2019) and density / coverage
  (Naeem et al. 2020): ``prdc.compute_prdc``, the reference implementation (package ``prdc``).

Both libraries (and their deps numpy, scipy, scikit-learn) install from PyPI without torch::

    pip install vendi-score==0.0.3 prdc==0.2

They are imported lazily so the node pack itself never needs them.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch

INSTALL_HINT = "pip install vendi-score==0.0.3 prdc==0.2"


def _as_features(x, name: str) -> np.ndarray:
    """``[N, ...]`` tensor/array -> float64 ``[N, D]`` numpy, finite."""
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim < 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch [N, ...], got shape {a.shape}")
    a = a.reshape(a.shape[0], -1)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def vendi_score(features, q: float = 1.0) -> float:
    """Vendi score of ``features [N, ...]`` with the cosine-similarity kernel (order ``q``; 1 = Shannon)."""
    try:
        from vendi_score import vendi
    except ImportError as err:
        raise ImportError(f"vendi_score needs the vendi-score package: {INSTALL_HINT}") from err
    x = _as_features(features, "features")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"vendi_score: zero feature vectors at rows {np.nonzero(norms == 0)[0][:10].tolist()}")
    x = x / norms[:, None]
    with warnings.catch_warnings():      # vendi-score 0.0.3 touches the deprecated scipy.sparse.csr namespace
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(vendi.score_K(x @ x.T, q=q))


def knn_precision_recall(real, fake, k: int = 3) -> dict:
    """k-NN manifold precision / recall / density / coverage of ``fake`` against ``real`` (``prdc``)."""
    try:
        import prdc
    except ImportError as err:
        raise ImportError(f"knn_precision_recall needs the prdc package: {INSTALL_HINT}") from err
    r, f = _as_features(real, "real"), _as_features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake features differ in size: {r.shape[1]} vs {f.shape[1]}")
    if not (1 <= k < min(len(r), len(f))):
        raise ValueError(f"k must be in 1..{min(len(r), len(f)) - 1} for {len(r)} real and {len(f)} fake, got {k}")
    with contextlib.redirect_stdout(io.StringIO()):     # prdc prints the set sizes
        out = prdc.compute_prdc(real_features=r, fake_features=f, nearest_k=k)
    return {key: float(v) for key, v in out.items()}
