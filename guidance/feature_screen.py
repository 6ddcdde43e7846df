"""Exact range search through low-dimensional features held on the sampling device.

The feature map (one definition for the in-memory sets and for ``shield_db``, whose ``projection.py`` derives it
and wraps it for numpy): with a centre ``mu`` and ``A`` [D, k] of spectral norm ``<= 1`` (a scaled PCA basis),
``f(x) = [A^T (x - mu), n(x - mu)]`` with ``n(v)^2 = ||v||^2 - ||A^T v||^2``, so ``||f(q) - f(z)|| <= ||q - z||``
and a range query on features returns a superset of the true hits.

Float bounds, from exactly representable inputs:
- features are computed in float64 on the CPU and stored in float32: ``||f^(x) - f(x)|| <= e ||x - mu||`` with
  ``e = FEATURE_REL_ERROR`` (derived in ``shield_db/projection.py``; 1e-5 for ``D`` up to 10^6);
- a true hit therefore has ``||f^(q) - f^(z)|| <= R = r + e (||q - mu|| + max ||z - mu||)``;
- the device evaluates ``||b||^2 - 2 a.b`` in float32 (one ``addmm`` for the whole batch; ``||a||^2`` is
  constant per query) with error ``<= 2 (phi + 4u) (||a||^2 + max ||b||^2)``, where ``phi`` bounds the
  relative error of the device's dot product (:func:`dot_error_factor`: IEEE float32, or inputs rounded to
  TF32 / bfloat16 with float32 accumulation); the screen keeps every row whose computed value is
  ``<= R^2 (1 + 1e-6) - ||a||^2`` plus that error.

Candidates are then verified on the full latents by :func:`within_mask` (float32 around the queries' mean with a
rigorous bound, float64 for the pairs the bound cannot decide). Nothing is missed; a reported hit is real.
"""
from __future__ import annotations

import math

import torch

FEATURE_DIM = 64
FEATURE_REL_ERROR = 1e-5
FIT_SAMPLE_ROWS = 8192
SPECTRAL_SAFETY = 1.0 + 1e-9
FEATURE_CHUNK_ROWS = 512          # rows converted to float64 at once when computing features
SCREEN_CHUNK_ROWS = 1 << 20       # feature rows per screening matmul ([B, chunk] float32 result)
VERIFY_CHUNK_ROWS = 2048          # candidate latents moved to the query device at once
# Float64 distances relative error < D * 2^-52: a pair within r (1 + ACCEPT_REL) counts, so r itself always does.
ACCEPT_REL = 1e-9
U32 = 2.0 ** -24


def gamma(n: int, unit_roundoff: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``."""
    nu = n * unit_roundoff
    if nu >= 0.5:
        raise ValueError(f"gamma_n undefined for n={n}, u={unit_roundoff}")
    return nu / (1 - nu)


def input_roundoff(device: torch.device) -> float:
    """Unit roundoff to which a float32 matmul on ``device`` may round its inputs (0: IEEE float32 products)."""
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return 2.0 ** -8                      # bfloat16 inputs
    if device.type == "cuda" and (precision == "high" or torch.backends.cuda.matmul.allow_tf32):
        return 2.0 ** -11                     # TF32 inputs
    if device.type not in ("cpu", "cuda"):
        return 2.0 ** -11                     # unknown backends (MPS, XPU, ...): assume TF32-like inputs
    return 2.0 ** -11 if precision == "high" else 0.0


def dot_error_factor(dim: int, device: torch.device) -> float:
    """``phi`` with ``|fl(a.b) - a.b| <= phi |a| |b|`` for a float32 matmul of length ``dim`` on ``device``.

    Inputs rounded to unit roundoff ``v`` (exact products of the shorter mantissas), float32 accumulation in
    any order: ``(1 + v)^2 (1 + gamma_dim) - 1``.
    """
    v = input_roundoff(device)
    return (1 + v) ** 2 * (1 + gamma(dim, U32)) - 1


def fit_map(sample: torch.Tensor, dim: int = FEATURE_DIM, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu [D], A [D, k])`` float64 on the CPU from rows ``sample [n, D]``: top-``k`` PCA, ``||A||_2 <= 1``."""
    x = sample.detach().to("cpu", torch.float32).reshape(sample.shape[0], -1)
    n, big_d = x.shape
    check_feature_bound(big_d)
    mu = x.double().mean(0)
    k = max(0, min(int(dim), n - 1, big_d))
    if k == 0:
        return mu, torch.zeros(big_d, 0, dtype=torch.float64)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        # The directions only need to be good, not exact: exactness rests on ||A||_2 <= 1, enforced in float64.
        _, _, v = torch.svd_lowrank(x - mu.float(), q=min(k + 10, n, big_d), niter=2)
    finally:
        torch.random.set_rng_state(gen_state)
    basis, _ = torch.linalg.qr(v[:, :k].double())
    spectral = float(torch.linalg.matrix_norm(basis, ord=2)) * SPECTRAL_SAFETY
    return mu, basis / spectral


def check_feature_bound(dim: int) -> None:
    """The feature error bound holds while ``sqrt(3 gamma_{D+2}) + 2^-24 << FEATURE_REL_ERROR`` (float64);
    ``2^-23`` more covers shield_db's coarse screening features (``shield_db.cascade.prefix_features``)."""
    bound = math.sqrt(3 * gamma(dim + 2, 2.0 ** -53)) + U32 + 2 * U32 + 8 * gamma(dim + 2, 2.0 ** -53)
    if bound > FEATURE_REL_ERROR / 2:
        raise ValueError(f"feature error bound {bound:.2e} too large for D={dim}")


def map_features(x: torch.Tensor, mu: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(x) [n, k+1] float32, ||x - mu|| [n] float64)`` on the CPU, computed in float64 chunk by chunk."""
    flat = x.detach().to("cpu").reshape(x.shape[0], -1)
    if flat.shape[0] <= FEATURE_CHUNK_ROWS:  # a batch of queries: one chunk, no assembly (its cost is per call)
        return _chunk_features(flat, mu, a)
    feats = torch.empty(flat.shape[0], a.shape[1] + 1, dtype=torch.float32)
    norms = torch.empty(flat.shape[0], dtype=torch.float64)
    for start in range(0, flat.shape[0], FEATURE_CHUNK_ROWS):
        feats[start:start + FEATURE_CHUNK_ROWS], norms[start:start + FEATURE_CHUNK_ROWS] = \
            _chunk_features(flat[start:start + FEATURE_CHUNK_ROWS], mu, a)
    return feats, norms


def _chunk_features(x: torch.Tensor, mu: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xc = x.double() - mu  # never in place: a float64 input would be the caller's own tensor
    proj = xc @ a
    norm_sq = xc.square().sum(1)
    residual = (norm_sq - proj.square().sum(1)).clamp_min_(0).sqrt_()
    return torch.cat([proj, residual[:, None]], 1).float(), norm_sq.sqrt_()


class FeatureScreen:
    """Stored features ``[N, k+1]`` float32 resident on one device; one matmul per batch finds the candidates.

    ``feature_error`` is the bound ``e`` of the stored and query features (``||f^(x) - f(x)|| <= e ||x - mu||``),
    ``max_norm`` the largest ``||z - mu||`` of the stored rows.

    The screen computes ``c = ||z||^2 - 2 q.z`` for every stored row with one ``addmm`` and keeps the rows with
    ``c <= t_q``, where ``t_q = R^2 (1 + 1e-6) - ||q||^2 + 2.02 (phi + 4u)(||q||^2 + max ||z||^2)`` bounds every
    rounding of ``c`` (products, sums, the norms) for the device's ``phi`` (:func:`dot_error_factor`).
    """

    def __init__(self, feats: torch.Tensor, max_norm: float, feature_error: float = FEATURE_REL_ERROR):
        if feats.dim() != 2 or feats.dtype != torch.float32:
            raise ValueError(f"features must be float32 [N, k+1], got {feats.dtype} {tuple(feats.shape)}")
        self.feats = feats
        self.sq = feats.square().sum(1)
        self.max_sq = float(self.sq.max()) if len(self.sq) else 0.0
        self.max_norm, self.feature_error = float(max_norm), float(feature_error)

    @property
    def device(self) -> torch.device:
        return self.feats.device

    def __len__(self) -> int:
        return self.feats.shape[0]

    def to(self, device) -> "FeatureScreen":
        device = torch.device(device)
        if self.device == device:
            return self
        return FeatureScreen(self.feats.to(device), self.max_norm, self.feature_error)

    def thresholds(self, q_feats: torch.Tensor, query_norms: torch.Tensor, radius) -> torch.Tensor:
        """``[B]`` float32 ``t_q`` on the device, rounded up: a row with ``c > t_q`` is no hit of query ``q``."""
        q_sq = q_feats.detach().to("cpu", torch.float64).square().sum(1)
        reach = torch.as_tensor(radius, dtype=torch.float64) + self.feature_error * (query_norms.double() + self.max_norm)
        rounding = 2.02 * (dot_error_factor(q_feats.shape[1], self.device) + 4 * U32) * (q_sq + self.max_sq)
        value = (reach.square() * (1 + 1e-6) - q_sq + rounding).float()
        return torch.nextafter(value, torch.full_like(value, math.inf)).to(self.device)

    def scores(self, q_feats: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``c = ||z||^2 - 2 q.z`` ``[B, rows]`` float32 for stored rows ``start:stop`` (one ``addmm``)."""
        z = self.feats[start:stop]
        return torch.addmm(self.sq[start:stop], q_feats.to(self.device), z.T, alpha=-2)

    def candidates(self, q_feats: torch.Tensor, query_norms: torch.Tensor, radius) -> torch.Tensor:
        """Sorted stored rows (int64, CPU) that may lie within ``radius`` of some query (``[B]`` or scalar radius)."""
        limit = self.thresholds(q_feats, query_norms, radius)[:, None]
        found = []
        for start in range(0, len(self), SCREEN_CHUNK_ROWS):
            rows = (self.scores(q_feats, start, start + SCREEN_CHUNK_ROWS) <= limit).any(0).nonzero().flatten()
            found.append(rows.cpu() + start)
        return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)

    def nearest_rows(self, q_feats: torch.Tensor, k: int) -> torch.Tensor:
        """``[B, k']`` stored rows nearest in (computed) feature distance: cheap upper-bound probes."""
        best_c, best_i = [], []
        k = min(k, len(self))
        for start in range(0, len(self), SCREEN_CHUNK_ROWS):
            c, i = self.scores(q_feats, start, start + SCREEN_CHUNK_ROWS).topk(
                min(k, len(self) - start, SCREEN_CHUNK_ROWS), dim=1, largest=False)
            best_c.append(c)
            best_i.append(i + start)
        c, i = torch.cat(best_c, 1), torch.cat(best_i, 1)
        return i.gather(1, c.topk(k, dim=1, largest=False).indices).cpu()


def within_mask(queries: torch.Tensor, shields: torch.Tensor, radius: float,
                chunk_rows: int = VERIFY_CHUNK_ROWS, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[M]`` bool on the CPU: shield ``m`` lies within ``radius`` (closed ball) of at least one query.

    ``queries [B, D]`` (float32 or float64, any device); ``shields [M, D]`` (fp16/float32, any device) are moved
    there in chunks. Float32 around the queries' mean ``c``: ``d2 = ||q'||^2 + ||z'||^2 - 2 q'.z'`` with
    ``q' = fl(q - c)``, ``z' = fl(z - c)``. Rounding moves ``||q' - z'||`` from ``||q - z||`` by at most
    ``u (||q - c|| + ||z - c||)`` plus ``||q - fl32(q)||``, and ``d2`` from ``||q' - z'||^2`` by at most
    ``2 (phi + 4u)(||q'||^2 + ||z'||^2)`` (:func:`dot_error_factor`); pairs the bounds cannot decide are
    recomputed in float64 on the CPU from the exact inputs. With ``rows`` (int64 indices into ``shields``) only
    those shields are checked, gathered chunk by chunk (one copy each, centred in place). The device does only
    float32 work (the ``[B, chunk]`` products and norms); every float64 step runs on the CPU (MPS has no float64).
    """
    q = queries.float()
    device = q.device
    centre = q.mean(0)
    qc = q - centre
    qc_sq = qc.square().sum(1)
    g = max(dot_error_factor(q.shape[1], device), gamma(q.shape[1] + 2, U32)) + 4 * U32
    qc_sq_cpu = qc_sq.cpu()
    q_len = qc_sq_cpu.double().sqrt_().mul_(1 + 2 * g)
    q64 = None   # the exact queries on the host: only for float64 queries and for pairs the bound leaves open
    if queries.dtype != torch.float32:
        q64 = queries.detach().to("cpu", torch.float64)
        q_len += (q64 - q.cpu().double()).norm(dim=1).mul_(1 + 1e-6).div_(U32)   # ||q - fl32(q)||, in units of u
    count = shields.shape[0] if rows is None else rows.numel()
    out = torch.zeros(count, dtype=torch.bool)
    for start in range(0, count, chunk_rows):
        if rows is None:
            zc = shields[start:start + chunk_rows].to(device=device, dtype=torch.float32, copy=True)
        else:
            zc = shields.index_select(0, rows[start:start + chunk_rows].to(shields.device)).to(
                device=device, dtype=torch.float32)   # a fresh copy
        zc.sub_(centre)
        zc_sq = torch.linalg.vector_norm(zc, dim=1).square()
        d2 = (qc_sq[:, None] + zc_sq[None, :] - 2 * (qc @ zc.T)).cpu().double()
        zc_sq = zc_sq.cpu()
        slack = (qc_sq_cpu[:, None] + zc_sq[None, :]).double().mul_(2 * g).mul_(1 + 4 * g).add_(1e-300)
        shift = zc_sq.double().sqrt_().mul_(1 + 2 * g)[None, :].add(q_len[:, None]).mul_(U32)
        inside = (d2 + slack).sqrt_().add_(shift) <= radius
        lower = (d2 - slack).clamp_min_(0).sqrt_().sub_(shift)
        unsure = (lower <= radius * (1 + ACCEPT_REL)).logical_and_(~inside).nonzero().tolist()
        if unsure and q64 is None:
            q64 = queries.detach().to("cpu", torch.float64)
        for b, j in unsure:
            row = start + j if rows is None else int(rows[start + j])
            z64 = shields[row].detach().to("cpu", torch.float64).reshape(-1)
            inside[b, j] = float((z64 - q64[b]).square().sum()) <= radius * radius * (1 + ACCEPT_REL)
        out[start:start + zc.shape[0]] = inside.any(0)
    return out
