"""Particle guidance: repulsion = -grad of the kernel energy, median rule, permutation equivariance, N=1."""
import math

import pytest
import torch

from guidance.embeddings import make_embedding
from guidance.kernels import median_bandwidth, pairwise_sq_distances
from guidance.particle import kernel_energy, particle_guidance, repulsion


def test_repulsion_is_minus_finite_difference_gradient_of_kernel_energy():
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    h = float(median_bandwidth(e))
    phi = repulsion(e, h)
    fd = torch.zeros_like(e)
    step = 1e-6
    for i in range(e.shape[0]):
        for a in range(e.shape[1]):
            plus, minus = e.clone(), e.clone()
            plus[i, a] += step
            minus[i, a] -= step
            fd[i, a] = -(kernel_energy(plus, h) - kernel_energy(minus, h)) / (2 * step)
    torch.testing.assert_close(phi, fd, rtol=1e-6, atol=1e-9)


def test_median_bandwidth_is_median_squared_distance_over_log_n_minus_1():
    gen = torch.Generator().manual_seed(1)
    e = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    d2 = sorted(float((e[i] - e[j]).square().sum()) for i in range(6) for j in range(i + 1, 6))
    lower_median = d2[(len(d2) - 1) // 2]
    assert float(median_bandwidth(e)) == pytest.approx(lower_median / math.log(5), rel=1e-12)


def test_median_bandwidth_two_particles_uses_log_2():
    e = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    assert float(median_bandwidth(e)) == pytest.approx(25.0 / math.log(2))


@pytest.mark.parametrize("space", ["latent", "pooled", "colour", "edges"])
def test_particle_guidance_is_permutation_equivariant(space):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, 8, 8, generator=gen)
    perm = torch.tensor([3, 0, 4, 1, 2])
    emb = make_embedding(space, 4)
    out = particle_guidance(x, 0.7, emb).delta
    out_perm = particle_guidance(x[perm], 0.7, emb).delta
    torch.testing.assert_close(out_perm, out[perm], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("space", ["latent", "pooled", "colour", "edges"])
def test_batch_of_one_gets_zero_correction(space):
    x = torch.randn(1, 4, 8, 8)
    out = particle_guidance(x, 1.0, make_embedding(space, 4)).delta
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def test_latent_correction_is_kernel_weighted_separation_and_moves_particles_apart():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    flat = x.reshape(4, -1)
    h = median_bandwidth(flat)
    k = torch.exp(-torch.cdist(flat, flat).square() / h)
    expected = 0.5 * 3.0 * (k.sum(1, keepdim=True) * flat - k @ flat) / h.sqrt()
    res = particle_guidance(x, 0.5, make_embedding("latent"), sigma=3.0)
    torch.testing.assert_close(res.delta.reshape(4, -1), expected.float(), rtol=1e-5, atol=1e-6)
    moved = (flat + res.delta.reshape(4, -1).double())
    assert torch.pdist(moved).mean() > torch.pdist(flat).mean()


def test_pooled_correction_moves_the_embedding_by_the_kernel_step():
    """For average pooling (P P^T = I / area) the embedded prediction moves by strength * sigma * sqrt(h)/2 * phi."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 8, 8, generator=gen, dtype=torch.float64)
    emb = make_embedding("pooled", 2)
    res = particle_guidance(x, 0.3, emb, sigma=2.0)
    e = emb(x)
    phi = repulsion(e, res.bandwidth)
    torch.testing.assert_close(emb(x + res.delta.double()) - e, 0.3 * 2.0 * math.sqrt(res.bandwidth) / 2 * phi,
                               rtol=1e-4, atol=1e-7)


def test_scale_equivariance():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    for space in ("latent", "pooled", "edges"):
        emb = make_embedding(space, 4)
        a = particle_guidance(x, 0.5, emb, sigma=0.7).delta
        b = particle_guidance(10 * x, 0.5, emb, sigma=7.0).delta
        tol = 2e-2 if space == "edges" else 1e-4   # edges: the eps inside the sqrt breaks exact equivariance
        assert float((b - 10 * a).norm() / b.norm()) < tol, space


def test_fixed_bandwidth_and_errors():
    x = torch.randn(3, 4, 4, 4)
    assert particle_guidance(x, 1.0, bandwidth=2.5).bandwidth == pytest.approx(2.5)
    with pytest.raises(ValueError, match="bandwidth"):
        particle_guidance(x, 1.0, bandwidth=-1.0)
    with pytest.raises(ValueError, match="space"):
        make_embedding("dino")
    with pytest.raises(ValueError, match="images"):
        make_embedding("pooled", 2)(torch.randn(3, 5))


class FlatEmbedding:
    """The latent embedding under another name: forces the generic autograd path (reference for the fast path)."""

    linear = True

    def __call__(self, x):
        return x.reshape(x.shape[0], -1)

    def gram_diag(self, x):
        return torch.ones(x[0].numel(), dtype=x.dtype, device=x.device)


def explicit_sq_distances(e):
    return (e[:, None, :] - e[None, :, :]).square().sum(-1)


def test_pairwise_sq_distances_match_explicit_differences():
    gen = torch.Generator().manual_seed(6)
    e = torch.randn(7, 300, generator=gen, dtype=torch.float64) + 50.0       # a large common offset
    d2 = pairwise_sq_distances(e)
    torch.testing.assert_close(d2, explicit_sq_distances(e), rtol=1e-12, atol=1e-9)
    assert torch.equal(d2, d2.t()) and torch.count_nonzero(d2.diagonal()) == 0
    e32 = (torch.randn(16, 4 * 32 * 32, generator=gen) * 5 + 3.0)
    ref = explicit_sq_distances(e32.double())
    assert float(((pairwise_sq_distances(e32).double() - ref).abs() / ref.max()).max()) < 1e-5
    same = torch.ones(3, 5)
    assert torch.equal(pairwise_sq_distances(same), torch.zeros(3, 3))


def test_repulsion_equals_the_pair_sum():
    gen = torch.Generator().manual_seed(7)
    e = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    h = 1.7
    k = torch.exp(-explicit_sq_distances(e) / h)
    ref = torch.stack([sum((2 / h) * k[i, j] * (e[i] - e[j]) for j in range(6)) for i in range(6)])
    torch.testing.assert_close(repulsion(e, h), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bandwidth", [None, 3.0])
def test_latent_fast_path_equals_the_generic_autograd_path(bandwidth):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    fast = particle_guidance(x, 0.4, make_embedding("latent"), bandwidth, sigma=2.5)
    generic = particle_guidance(x, 0.4, FlatEmbedding(), bandwidth, sigma=2.5)
    assert fast.bandwidth == pytest.approx(generic.bandwidth, rel=1e-6)
    torch.testing.assert_close(fast.delta, generic.delta, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("space", ["latent", "pooled", "edges"])
def test_coinciding_particles_get_zero_not_nan(space):
    x = torch.randn(1, 4, 8, 8).repeat(3, 1, 1, 1)
    out = particle_guidance(x, 1.0, make_embedding(space, 4)).delta
    assert torch.count_nonzero(out) == 0


# -- video latents [B, C, T, H, W] (issue 12 item 6) -----------------------------------------------------------

@pytest.mark.parametrize("space", ["pooled", "colour", "edges"])
def test_video_embedding_is_the_frames_embeddings_side_by_side(space):
    video = torch.randn(3, 4, 5, 6, 7, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    emb = make_embedding(space, 3)
    per_frame = torch.stack([emb(video[:, :, t]).reshape(3, -1) for t in range(5)], 1)   # [B, T, d_frame]
    if space == "edges":                        # edges of a video: one map per frame, frame-major
        expected = per_frame.reshape(3, -1)
    else:                                       # pooled/colour: frames folded into channels, channel-major
        expected = per_frame.reshape(3, 5, 4, -1).transpose(1, 2).reshape(3, -1)
    torch.testing.assert_close(emb(video), expected)
    still = video[:, :, :1]
    torch.testing.assert_close(emb(still), emb(video[:, :, 0]))


@pytest.mark.parametrize("space", ["pooled", "colour"])
def test_video_gram_diagonal_is_exact(space):
    """``gram_diag`` of a linear video embedding equals diag(P P^T) of its Jacobian (uneven 5x7 windows)."""
    video = torch.zeros(1, 2, 3, 5, 7, dtype=torch.float64)
    emb = make_embedding(space, 3)
    p = torch.autograd.functional.jacobian(lambda y: emb(y[None])[0], video[0]).reshape(-1, video[0].numel())
    torch.testing.assert_close(emb.gram_diag(video), (p @ p.t()).diagonal())


@pytest.mark.parametrize("space", ["latent", "pooled", "colour", "edges"])
def test_particle_guidance_on_a_one_frame_video_equals_the_image(space):
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    emb = make_embedding(space, 4)
    image = particle_guidance(x, 0.5, emb, sigma=2.0).delta
    video = particle_guidance(x[:, :, None], 0.5, emb, sigma=2.0).delta
    torch.testing.assert_close(video[:, :, 0], image, rtol=1e-5, atol=1e-6)
    moving = particle_guidance(torch.randn(4, 4, 3, 8, 8), 0.5, emb, sigma=2.0).delta
    assert moving.shape == (4, 4, 3, 8, 8) and torch.isfinite(moving).all() and bool(moving.abs().sum() > 0)


def test_embeddings_refuse_other_ranks_with_the_shape():
    with pytest.raises(ValueError, match=r"images \[B, C, H, W\] or videos \[B, C, T, H, W\], got shape \(2, 4, 9\)"):
        make_embedding("pooled", 2)(torch.zeros(2, 4, 9))
