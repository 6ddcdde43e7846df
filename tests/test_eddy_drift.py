"""EDDY: the drift is divergence-free w.r.t. the product density; exact vs Hutchinson; equivariance; N=1."""
import math

import pytest
import torch

from guidance.eddy_drift import eddy_drift
from guidance.embeddings import make_embedding
from guidance.kernels import median_bandwidth
from guidance.particle import repulsion
from test_particle import FlatEmbedding  # the generic-path double, shared with the PG tests

MU = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
W = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
S2, SIGMA = 0.3, 0.7


def gmm_log_density(x):
    """Log density of the 2-D mixture noised to SIGMA (closed form), per particle."""
    var = S2 + SIGMA ** 2
    d = (x[..., None, :] - MU).square().sum(-1)
    return torch.logsumexp(torch.log(W) - d / (2 * var) - math.log(2 * math.pi * var), -1)


def gmm_score(x):
    xg = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gmm_log_density(xg).sum(), xg)
    return g


def divergence_of_p_times(field, x, step=1e-5):
    """``(div(p v), sum |d_a (p v_a)|)`` at ``x [N, 2]`` by central differences, p = prod of particle densities."""
    flat = x.reshape(-1)

    def pv(y):
        y = y.reshape(x.shape)
        return (gmm_log_density(y).sum().exp() * field(y)).reshape(-1)

    total, scale = 0.0, 0.0
    for a in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[a] = step
        d = float((pv(flat + e)[a] - pv(flat - e)[a]) / (2 * step))
        total, scale = total + d, scale + abs(d)
    return total, scale


@pytest.mark.parametrize("bandwidth", [None, 1.3])
def test_eddy_is_divergence_free_for_the_product_density(bandwidth):
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(3, 2, generator=gen, dtype=torch.float64) * 1.5
        div, scale = divergence_of_p_times(lambda y: eddy_drift(y, gmm_score(y), bandwidth=bandwidth), x)
        assert scale > 0
        assert abs(div) < 1e-7 * scale, (div, scale)


def test_plain_repulsion_is_not_divergence_free():
    """Negative control: the same check detects particle guidance's field (it changes the distribution)."""
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    div, scale = divergence_of_p_times(lambda y: repulsion(y, float(median_bandwidth(x))), x)
    assert abs(div) > 1e-2 * scale


def test_median_bandwidth_derivative_is_needed_for_exactness():
    """Treating the median bandwidth as a constant (as particle guidance does) breaks div(p v) = 0."""
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.5
    h0 = float(median_bandwidth(x))
    frozen = divergence_of_p_times(lambda y: eddy_drift(y, gmm_score(y), bandwidth=h0), x)
    assert abs(frozen[0]) < 1e-7 * frozen[1]       # a constant h is fine ...
    # ... but a state-dependent h whose derivative is dropped is not: h(y) = median of y, frozen gradient.
    import guidance.eddy_drift as eddy_module
    original = eddy_module._bandwidth_and_gradient
    try:
        eddy_module._bandwidth_and_gradient = lambda e, b, d2: (median_bandwidth(e), None)
        broken = divergence_of_p_times(lambda y: eddy_drift(y, gmm_score(y)), x)
    finally:
        eddy_module._bandwidth_and_gradient = original
    assert abs(broken[0]) > 1e-4 * broken[1]


def test_hutchinson_matches_exact_divergence_on_average():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    s = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    emb = make_embedding("pooled", 3)          # 4 -> 3 windows overlap: P P^T is not diagonal
    exact = eddy_drift(x, s, emb)
    probes = [eddy_drift(x, s, emb, divergence="hutchinson", generator=gen) for _ in range(100)]
    mean = torch.stack(probes).mean(0)
    spread = torch.stack(probes).std(0) / math.sqrt(len(probes))
    assert float((mean - exact).abs().max()) < 5 * float(spread.max()) + 1e-12
    assert float(spread.max()) > 0             # the estimator is really random per draw


def _brute_force_eddy(x, s, emb):
    """v_i = sum_j A_ij s_j + div_{x_j} A_ij with A_ij = k_ij J_i^T diag(r_ij) J_j built as explicit matrices."""
    n, d = x.shape[0], x[0].numel()
    jac = torch.autograd.functional.jacobian

    def block(i, j, xj):
        xs = torch.cat([x[:j], xj[None], x[j + 1:]])
        e = emb(xs)
        h = median_bandwidth(e)
        r = e[i] - e[j]
        k = torch.exp(-r.square().sum() / h)
        ji = jac(lambda y: emb(y[None])[0], x[i], create_graph=True).reshape(-1, d)
        jj = jac(lambda y: emb(y[None])[0], xj, create_graph=True).reshape(-1, d)
        return k * ji.t() @ torch.diag(r) @ jj

    v = torch.zeros(n, d, dtype=x.dtype)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            a = block(i, j, x[j])
            da = jac(lambda y: block(i, j, y), x[j]).reshape(d, d, d)    # [a, b, c] = d A_ab / d x_c
            v[i] += a @ s[j].reshape(-1) + torch.einsum("abb->a", da)
    return v.reshape(x.shape)


@pytest.mark.parametrize("space", ["latent", "pooled", "edges"])
def test_drift_matches_brute_force_matrices(space):
    gen = torch.Generator().manual_seed(4)
    size = 4 if space == "pooled" else 3       # the brute-force second derivatives are slow: keep d small
    x = torch.randn(3, 1, size, size, generator=gen, dtype=torch.float64)
    s = torch.randn(3, 1, size, size, generator=gen, dtype=torch.float64)
    emb = make_embedding(space, 2)
    reference = _brute_force_eddy(x, s, emb)
    if space != "edges":
        torch.testing.assert_close(eddy_drift(x, s, emb), reference, rtol=1e-8, atol=1e-10)
    else:
        draws = torch.stack([eddy_drift(x, s, emb, generator=gen, probes=20) for _ in range(10)])
        err = (draws.mean(0) - reference).abs().max()
        assert float(err) < 5 * float(draws.std(0).max() / math.sqrt(10)) + 1e-9


def test_permutation_equivariance_and_batch_of_one():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64)
    s = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    for space in ("latent", "pooled", "colour"):
        emb = make_embedding(space, 3)
        torch.testing.assert_close(eddy_drift(x[perm], s[perm], emb), eddy_drift(x, s, emb)[perm])
    one = eddy_drift(x[:1], s[:1])
    assert torch.count_nonzero(one) == 0


def test_errors():
    x = torch.randn(3, 1, 4, 4)
    with pytest.raises(ValueError, match="linear embedding"):
        eddy_drift(x, x, make_embedding("edges", 2), divergence="exact")
    with pytest.raises(ValueError, match="shape"):
        eddy_drift(x, x[:2])


@pytest.mark.parametrize("bandwidth", [None, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_latent_fast_path_equals_the_generic_linear_path(bandwidth, dtype):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    s = torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    reference = eddy_drift(x, s, FlatEmbedding(), bandwidth)
    fast = eddy_drift(x.to(dtype), s.to(dtype), make_embedding("latent"), bandwidth)
    assert fast.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(fast.double(), reference, rtol=tol, atol=tol)


def test_coinciding_particles_get_zero_not_nan():
    x = torch.randn(1, 2, 4, 4).repeat(3, 1, 1, 1)
    for space in ("latent", "pooled", "edges"):
        v = eddy_drift(x, torch.randn(3, 2, 4, 4), make_embedding(space, 2))
        assert torch.count_nonzero(v) == 0, space


@pytest.mark.parametrize("space", ["latent", "pooled"])
def test_drift_on_video_matches_brute_force_matrices(space):
    """Video latents [N, C, T, H, W] (issue 12 item 6): the exact divergence holds with frames in the item."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 2, 2, 3, generator=gen, dtype=torch.float64)
    s = torch.randn(3, 1, 2, 2, 3, generator=gen, dtype=torch.float64)
    emb = make_embedding(space, 2)
    torch.testing.assert_close(eddy_drift(x, s, emb), _brute_force_eddy(x, s, emb), rtol=1e-8, atol=1e-10)


def test_hutchinson_drift_on_video_is_finite_and_frame_aware():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 3, 6, 6, generator=gen)
    v = eddy_drift(x, -x, make_embedding("edges", 2), generator=gen)
    assert v.shape == x.shape and torch.isfinite(v).all() and bool(v[:, :, 2].abs().sum() > 0)
