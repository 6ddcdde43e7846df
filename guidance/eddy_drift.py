"""EDDY: a divergence-free pairwise drift that leaves the particles' distribution unchanged
(Vinograd, Achituve, Fetaya, "Diverse Sampling in Diffusion Models with Marginal Preserving Particle
Guidance", arXiv:2605.06553; only the abstract was available to us, the construction below is our own
derivation of the idea it states).

Derivation. Let ``x = (x_1, ..., x_N)`` be the batch at noise level ``sigma``, ``p(x) = prod_i p_t(x_i)``
the joint density of independent samples, ``s_i = grad log p_t(x_i)`` the score (from the denoiser:
``s = (D(x, sigma) - x) / sigma^2``, or ``(alpha D - x) / sigma^2`` when ``x = alpha x0 + sigma eps``).
For any antisymmetric matrix field ``A(x)`` (``A^T = -A``, size ``Nd x Nd``) put

    v = (1 / p) div(p A),    i.e.  v_a = sum_b [ A_ab d_b log p + d_b A_ab ].

Then ``div(p v) = sum_ab d_a d_b (p A_ab) = 0``: a symmetric operator ``d_a d_b`` contracted with an
antisymmetric tensor. Adding ``v`` to the drift of the sampler (ODE or SDE) adds ``-div(p v) = 0`` to the
right-hand side of the Fokker-Planck equation, so ``p`` still solves it. With ``d x d`` blocks ``A_ij``
(``A_ji = -A_ij^T``, ``A_ii = 0``) and ``d log p / d x_j = s_j`` the block of particle ``i`` reads

    v_i = sum_j [ A_ij s_j + div_{x_j} A_ij ],     (div_{x_j} A_ij)_a = sum_b d/d(x_j)_b (A_ij)_ab.

Our blocks, built from the kernel-weighted repulsive direction ``r_ij = e_i - e_j`` of an embedding
``e_i = e(x_i)`` with Jacobian ``J_i``: ``A_ij = k_ij J_i^T diag(r_ij) J_j``, ``k_ij = exp(-||r_ij||^2 / h)``.
Antisymmetry: ``A_ji = k_ij J_j^T diag(-r_ij) J_i = -A_ij^T``. For a linear embedding ``e = P x``
(latent: ``P = I``; pooling) the divergence is exact and cheap:

    div_{x_j} A_ij = k_ij P^T [ (2/h) r_ij * (P P^T r_ij) - diag(P P^T) + (||r_ij||^2 / h^2) r_ij * (P P^T H_j) ]

(``*`` elementwise, ``H_j = grad_{e_j} h`` the derivative of the median bandwidth, non-zero for the two
particles of the median pair; with a fixed bandwidth ``H = 0``). For a nonlinear embedding (edges) we use
Hutchinson's estimator ``div_{x_j} A_ij = E_z[ d/d eps (A_ij(x_j + eps z) z) ]`` with Rademacher ``z``; the
directional derivatives ``J z`` and ``d^2 e(x + eps z)/d eps^2`` inside it are exact (forward mode), so the
only approximation is the Monte-Carlo average over ``probes`` draws (unbiased, not exact per draw).

What is exact and what is not. (1) With exact scores and exact divergence, ``p`` is invariant: every
particle keeps its marginal AND the batch stays exactly distributed as ``N`` independent samples. A
consequence we state plainly: in that exact limit the *expected* mean pairwise distance of a batch
cannot change either; EDDY changes which sample each starting noise is carried to (the coupling), not the
law. Diversity changes seen in practice come from what breaks exactness: time discretisation of the
sampler, a learned/CFG score that is not the score of the sampled process, Hutchinson noise. (A batch
that is more diverse with every marginal kept exactly needs a dependent joint law instead: see
``guidance/eddy.py`` (the node's "EDDY" mode: correlated noise, the diffusion-term symmetry of the
same Fokker-Planck equation) and ``guidance/coupling.py`` (coupled starting noises). Do not combine this drift
with them: it is divergence-free for the *product* density only, and on a coupled batch it shifts every
marginal.) (2) The
kernel is evaluated on the noisy particles ``x_t`` (the variables ``p_t`` is a density of); evaluating it
on predictions ``D(x_t)`` would need the Jacobian of the network in the divergence. (3) The caller adds
``strength * v`` to ``dx/dsigma`` (``D' = D + sigma * strength * v`` in k-diffusion form); any scalar
factor keeps ``div(p v) = 0``.
"""
from __future__ import annotations

import math

import torch

from .embeddings import LatentEmbedding
from .kernels import fixed_bandwidth, median_pair, pairwise_sq_distances


def _bandwidth_and_gradient(e: torch.Tensor, bandwidth, d2: torch.Tensor):
    """``(h, H)`` with ``H = grad_e h``: the median rule depends on the median pair ``(a, b)`` only,
    ``h = ||e_a - e_b||^2 / log(max(N - 1, 2))``, so ``H`` is ``(a, b, H_a)`` (rows a and b, ``H_b = -H_a``, all
    other rows 0); a fixed bandwidth has ``H = None``."""
    fixed = fixed_bandwidth(bandwidth)
    if fixed is not None:
        return torch.tensor(fixed, dtype=e.dtype, device=e.device), None
    value, a, b = median_pair(d2)
    log_n = math.log(max(e.shape[0] - 1, 2))
    return value / log_n, (a, b, 2 * (e[a] - e[b]) / log_n)


def dense_gradient(grad_h, e: torch.Tensor) -> torch.Tensor:
    """``H`` as an ``[N, d_e]`` tensor (zeros for a fixed bandwidth)."""
    out = torch.zeros_like(e)
    if grad_h is not None:
        a, b, row = grad_h
        out[a], out[b] = row, -row
    return out


def pair_sum(k: torch.Tensor, e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_j k_ij (e_i - e_j) * w_j`` for all ``i`` (``*`` elementwise), without an ``[N, N, d]`` tensor."""
    return e * (k @ w) - k @ (e * w)


def pair_sum_both(k: torch.Tensor, e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum_j k_ij (e_i - e_j) * (q_i - q_j)`` for all ``i``."""
    return k.sum(1, keepdim=True) * e * q - e * (k @ q) - q * (k @ e) + k @ (e * q)


def _latent_terms(e, s, k, d2, h, grad_h):
    """``_linear_terms`` for ``P = I`` with the pair sums fused (3 products with ``k``, few ``[N, d]`` temporaries):
    ``T = e * (k (s - 4/h e) + 2/h (k 1) e) + k (e * (2/h e - s)) - k 1`` (+ the bandwidth term)."""
    hf = float(h)
    rows = k.sum(1, keepdim=True)
    t = torch.addcmul(k @ torch.add(s, e, alpha=-4.0 / hf), rows, e, value=2.0 / hf).mul_(e)
    t.addmm_(k, torch.add(e, s, alpha=-hf / 2.0).mul_(e), alpha=2.0 / hf).sub_(rows)
    if grad_h is not None:            # sum_j c_ij (e_i - e_j) * H_j, only j = a, b: H_a * (c_ia (e_i - e_a) - c_ib (e_i - e_b))
        a, b, row = grad_h
        c = k * d2 / h ** 2
        w = e * (c[:, a] - c[:, b])[:, None]
        w.addr_(c[:, a], e[a], alpha=-1).addr_(c[:, b], e[b])
        t.addcmul_(w, row[None, :])
    return t


def _linear_terms(emb, x, e, s, k, d2, h, grad_h):
    """Embedding-space field ``T_i`` (``v_i = P^T T_i``) of a linear embedding, exact divergence."""
    def gram(y):  # P P^T y for embedding-space rows y
        if isinstance(emb, LatentEmbedding):
            return y
        with torch.enable_grad():
            xg = torch.zeros_like(x).requires_grad_(True)
            (pt,) = torch.autograd.grad(emb(xg), xg, grad_outputs=y)
        return emb(pt)

    es = emb(s)                                        # P s_j
    score_part = pair_sum(k, e, es)
    div_part = (2.0 / h) * pair_sum_both(k, e, gram(e)) - k.sum(1, keepdim=True) * emb.gram_diag(x)[None, :]
    if grad_h is not None:
        div_part = div_part + pair_sum(k * d2 / h ** 2, e, gram(dense_gradient(grad_h, e)))
    return score_part + div_part


def _directional(emb, x, z):
    """``(e(x), J z, d^2/d eps^2 e(x + eps z))`` by nested forward-mode differentiation."""
    def first(y):
        return torch.func.jvp(emb, (y,), (z,))
    (e0, g1), (_, g2) = torch.func.jvp(first, (x,), (z,))
    return e0, g1, g2


def _hutchinson_terms(emb, x, e, s, k, d2, h, grad_h, probes, generator):
    """Embedding-space field ``T_i`` (``v_i = J_i^T T_i``) with a Hutchinson estimate of the divergence."""
    grad_h = dense_gradient(grad_h, e)
    _, js, _ = _directional(emb, x, s)                  # J_j s_j (exact JVP)
    total = pair_sum(k, e, js)
    acc = torch.zeros_like(e)
    for _ in range(probes):
        z = torch.randint(0, 2, x.shape, generator=generator, device="cpu").to(x.device, x.dtype) * 2 - 1
        _, g1, g2 = _directional(emb, x, z)
        # d/d eps of k_ij(eps) r_ij(eps) * g1_j(eps) at 0, r_ij(eps) = e_i - e(x_j + eps z_j):
        # dk = k [(2/h) r.g1 + (|r|^2/h^2) H_j.g1];  d r = -g1;  d g1 = g2.
        r_dot = e @ g1.t() - (e * g1).sum(1)[None, :]           # [i, j] = (e_i - e_j) . g1_j
        dk = k * ((2.0 / h) * r_dot + (d2 / h ** 2) * (grad_h * g1).sum(1)[None, :])
        acc += pair_sum(dk, e, g1) - k @ (g1 * g1) + pair_sum(k, e, g2)
    return total + acc / probes


def eddy_drift(x: torch.Tensor, score: torch.Tensor, embedding=None, bandwidth=None, divergence: str = "auto",
               probes: int = 1, generator: torch.Generator = None) -> torch.Tensor:
    """EDDY drift ``v_i = sum_j [A_ij s_j + div_{x_j} A_ij]`` for particles ``x [N, ...]`` with scores ``score``.

    ``divergence``: ``"auto"`` (exact for linear embeddings, Hutchinson otherwise), ``"exact"`` or
    ``"hutchinson"`` (``probes`` Rademacher draws). Returns float32 (float64 if ``x`` is float64).
    """
    if x.shape != score.shape or x.dim() < 2:
        raise ValueError(f"x and score must be batches [N, ...] of one shape, got {tuple(x.shape)} and "
                         f"{tuple(score.shape)}")
    if divergence not in ("auto", "exact", "hutchinson"):
        raise ValueError(f"divergence must be 'auto', 'exact' or 'hutchinson', got {divergence!r}")
    if int(probes) != probes or probes < 1:
        raise ValueError(f"probes must be a whole number >= 1, got {probes!r}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.shape[0] < 2:
        return torch.zeros_like(x, dtype=dtype)
    emb = embedding or LatentEmbedding()
    if divergence == "exact" and not emb.linear:
        raise ValueError("an exact EDDY divergence needs a linear embedding (latent, pooled, colour); "
                         "use divergence='hutchinson' for edges")
    with torch.inference_mode(False):
        latent = isinstance(emb, LatentEmbedding) and divergence != "hutchinson"
        x, s = x.detach().to(dtype), score.detach().to(dtype)
        if not latent:
            x, s = x.clone(), s.clone()
        e = emb(x).detach()
        d2 = pairwise_sq_distances(e)
        h, grad_h = _bandwidth_and_gradient(e, bandwidth, d2)
        if not h > 0:                                   # all particles coincide: no direction to rotate along
            return torch.zeros_like(x)
        k = torch.exp(-d2 / h).fill_diagonal_(0)
        if latent:
            return _latent_terms(e, s.reshape(e.shape), k, d2, h, grad_h).reshape(x.shape)
        if emb.linear and divergence != "hutchinson":
            t = _linear_terms(emb, x, e, s, k, d2, h, grad_h)
        else:
            t = _hutchinson_terms(emb, x, e, s, k, d2, h, grad_h, probes, generator)
        if isinstance(emb, LatentEmbedding):
            return t.reshape(x.shape)
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            (v,) = torch.autograd.grad(emb(xg), xg, grad_outputs=t)
        return v.detach()
