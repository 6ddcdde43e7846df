"""Start coupling: every coupled noise is exactly N(0, I), the residual is untouched, the projected parts follow
the design (inner products r_i r_j d_i.d_j), deterministic, exact in the edge cases, clear errors."""
import math

import pytest
import torch

from guidance.coupling import (couple_noise, coupled_coordinates, design, haar_rotation, lift, project,
                               rotation_seed)

KS_CRITICAL = 1.95        # sqrt(n) * KS distance exceeds this with probability ~0.001 under the null


def normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    """sqrt(n) * sup |F_n - F| of 1-D ``samples`` against the continuous ``cdf``."""
    x, _ = samples.double().flatten().sort()
    n = x.numel()
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return math.sqrt(n) * float(torch.maximum(i / n - f, f - (i - 1) / n).max())


def chi_cdf(m):
    """CDF of the chi distribution with ``m`` degrees of freedom: P(m/2, r^2/2)."""
    return lambda r: torch.special.gammainc(torch.tensor(m / 2, dtype=torch.float64), r.square() / 2)


def draws(batch, shape, grid, count, seed=0):
    """``count`` independent couplings of fresh noise: (noise [count, batch, ...], coupled)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(count, batch, *shape, generator=gen, dtype=torch.float64)
    return z, torch.stack([couple_noise(zk, grid) for zk in z])


@pytest.mark.parametrize("batch,channels,grid", [(3, 2, 2), (4, 2, 1), (8, 4, 1), (4, 1, 1)])
def test_each_coupled_noise_is_standard_normal(batch, channels, grid):
    """Designs: simplex (m=8), square (m=2), Thomson cross-polytope (m=4), alternating signs (m=1)."""
    shape = (channels, 4, 4)
    m = channels * grid * grid
    z, out = draws(batch, shape, grid, 1500)
    for i in (0, batch - 1):
        coords = torch.stack([project(o, grid)[i] for o in out])             # [draws, m]
        for k in range(m):
            assert ks_statistic(coords[:, k], normal_cdf) < KS_CRITICAL, (i, k)
        assert ks_statistic(coords.norm(dim=1), chi_cdf(m)) < KS_CRITICAL
        cov = coords.t() @ coords / len(coords)
        torch.testing.assert_close(cov, torch.eye(m, dtype=torch.float64), atol=0.12, rtol=0)
        assert ks_statistic(out[:, i].flatten()[::7], normal_cdf) < KS_CRITICAL     # every latent element


def test_coupled_directions_are_not_fixed_negative_control():
    """The marginal test has power: without the random rotation every particle would sit on its design vector."""
    z, _ = draws(4, (2, 4, 4), 1, 400)
    d, _ = design(4, 2)
    fixed = torch.stack([project(zk, 1).norm(dim=1)[:, None] * d for zk in z])   # r_i d_i, no rotation
    assert ks_statistic(fixed[:, 0, 0], normal_cdf) > 3 * KS_CRITICAL


def test_batch_is_negatively_dependent_with_the_design_correlation():
    batch, grid = 4, 2
    m = 2 * grid * grid
    z, out = draws(batch, (2, 4, 4), grid, 1500, seed=1)
    coords = torch.stack([project(o, grid) for o in out])                    # [draws, N, m]
    ip = (coords[:, 0] * coords[:, 1]).sum(1)
    mean_chi = math.sqrt(2) * math.exp(math.lgamma((m + 1) / 2) - math.lgamma(m / 2))
    expected = -mean_chi ** 2 / (batch - 1)                                  # E r_i E r_j d_i.d_j (simplex)
    assert abs(float(ip.mean()) - expected) < 4 * float(ip.std()) / math.sqrt(len(ip))
    assert float(ip.mean()) < -2.0
    assert float((coords.sum(1).square().sum(1)).mean()) < 0.3 * batch * m    # batch sum nearly cancels


def test_residual_is_unchanged_and_projected_inner_products_follow_the_design():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(5, 3, 7, 9, generator=gen, dtype=torch.float64)       # blocks of unequal size
    grid = 3
    out = couple_noise(z, grid)
    residual = z - lift(project(z, grid), z.shape, grid)
    residual_out = out - lift(project(out, grid), z.shape, grid)
    torch.testing.assert_close(residual_out, residual, rtol=0, atol=1e-13)
    c, c_out = project(z, grid), project(out, grid)
    r = c.norm(dim=1)
    torch.testing.assert_close(c_out.norm(dim=1), r, rtol=1e-13, atol=0)
    d, name = design(5, 27)
    assert name == "regular simplex"
    torch.testing.assert_close(c_out @ c_out.t(), r[:, None] * r[None, :] * (d @ d.t()), rtol=0, atol=1e-12)
    assert not torch.allclose(c_out, c)


def test_projection_is_orthonormal_for_images_and_videos():
    gen = torch.Generator().manual_seed(4)
    for shape, grid in (((2, 3, 7, 5), 3), ((2, 2, 3, 6, 6), 2), ((1, 4, 8, 8), 1)):
        c = torch.randn(shape[0], shape[1] * grid * grid, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(project(lift(c, shape, grid), grid), c, rtol=0, atol=1e-13)   # P P^T = I
        z = torch.randn(*shape, generator=gen, dtype=torch.float64)
        y = lift(c, shape, grid)
        torch.testing.assert_close((z * y).sum(), (project(z, grid) * c).sum(), rtol=1e-12, atol=1e-12)  # adjoint


def test_video_coupling_is_constant_over_frames_and_keeps_the_residual():
    z = torch.randn(3, 2, 4, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = couple_noise(z, 2)
    change = out - z
    torch.testing.assert_close(change, change[:, :, :1].expand_as(change), rtol=0, atol=1e-13)
    c = project(out, 2)
    torch.testing.assert_close(c.norm(dim=1), project(z, 2).norm(dim=1), rtol=1e-13, atol=0)


def test_deterministic_and_scale_equivariant():
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(4, 4, 8, 8, generator=gen)
    out = couple_noise(z, 2)
    assert out.dtype == z.dtype and out.shape == z.shape
    assert torch.equal(couple_noise(z.clone(), 2), out)
    # a power-of-two factor per particle is exact in floating point: same directions, same rotation
    scale = torch.tensor([1.0, 2.0, 0.5, 4.0]).reshape(4, 1, 1, 1)
    torch.testing.assert_close(couple_noise(z.double() * scale, 2), out.double() * scale, rtol=1e-6, atol=1e-6)
    other = couple_noise(torch.randn(4, 4, 8, 8, generator=gen), 2)
    assert not torch.allclose(project(other, 2) @ project(other, 2).t(), project(out, 2) @ project(out, 2).t())


def test_rotation_depends_only_on_the_directions():
    c = torch.randn(4, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    radii = torch.tensor([[2.0], [0.5], [1.0], [4.0]], dtype=torch.float64)  # powers of two: exact
    u = c / c.norm(dim=1, keepdim=True)
    assert rotation_seed(u) == rotation_seed((c * radii) / (c * radii).norm(dim=1, keepdim=True))
    out, scaled = coupled_coordinates(c), coupled_coordinates(c * radii)
    torch.testing.assert_close(scaled, out * radii, rtol=1e-14, atol=0)


def test_haar_rotation_is_orthogonal_and_centred():
    gen = torch.Generator().manual_seed(8)
    qs = torch.stack([haar_rotation(3, gen) for _ in range(2000)])
    torch.testing.assert_close(qs @ qs.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(2000, 3, 3),
                               rtol=0, atol=1e-12)
    assert float(qs.mean(0).abs().max()) < 0.06                    # E Q = 0 for the Haar law on O(3)
    torch.testing.assert_close(qs.square().mean(0), torch.full((3, 3), 1 / 3, dtype=torch.float64), rtol=0, atol=0.03)


@pytest.mark.parametrize("n,m,name", [(2, 1, "regular simplex"), (4, 3, "regular simplex"), (6, 64, "regular simplex"),
                                      (8, 2, "regular polygon"), (8, 1, "alternating signs"),
                                      (8, 4, "Thomson (Riesz-1) points"), (12, 3, "Thomson (Riesz-1) points")])
def test_designs_are_unit_and_spread(n, m, name):
    d, got = design(n, m)
    assert got == name and d.shape == (n, m)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    gram = d @ d.t()
    off = gram[~torch.eye(n, dtype=torch.bool)]
    if name == "regular simplex":
        torch.testing.assert_close(off, torch.full_like(off, -1 / (n - 1)), rtol=0, atol=1e-12)
    if name == "regular polygon":
        torch.testing.assert_close(gram[0, 1:], torch.cos(2 * math.pi * torch.arange(1, n, dtype=torch.float64) / n))
    if m >= 2:
        assert float(d.sum(0).norm()) < 1e-3                          # centred: the batch sum cancels
    if (n, m) == (8, 4):                                             # Thomson finds the cross-polytope (16-cell)
        assert float(off.max()) < 1e-3 and float(off.min()) < -1 + 1e-3
    if (n, m) == (12, 3):                                            # ... and the icosahedron
        assert float(off.max()) == pytest.approx(1 / math.sqrt(5), abs=1e-4)


def test_thomson_beats_random_points():
    d, _ = design(16, 4)
    rand = torch.randn(16, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    rand = rand / rand.norm(dim=1, keepdim=True)
    assert float(torch.pdist(d).min()) > 1.5 * float(torch.pdist(rand).min())


def test_batch_of_one_off_and_zero_noise():
    z = torch.randn(1, 4, 8, 8)
    assert couple_noise(z, 2) is z
    z4 = torch.randn(4, 4, 8, 8)
    assert couple_noise(z4, 0) is z4 and couple_noise(z4, None) is z4
    zero = torch.zeros(3, 4, 8, 8)
    assert torch.equal(couple_noise(zero, 2), zero)                   # disabled noise stays zero, no NaN


def test_errors_show_the_values():
    with pytest.raises(ValueError, match=r"shape \(4, 16\)"):
        couple_noise(torch.randn(4, 16), 1)
    with pytest.raises(ValueError, match="grid 8x8 is larger than the latent's 4x4"):
        couple_noise(torch.randn(2, 4, 4, 4), 8)
    with pytest.raises(ValueError, match="grid must be a whole number >= 1, got 1.5"):
        couple_noise(torch.randn(2, 4, 4, 4), 1.5)
    with pytest.raises(ValueError, match="NaN"):
        couple_noise(torch.full((2, 4, 4, 4), float("nan")), 1)
    with pytest.raises(ValueError, match="n=0"):
        design(0, 3)


def test_whole_float_grid_is_accepted():
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(10))
    assert torch.equal(couple_noise(z, 2.0), couple_noise(z, 2))
