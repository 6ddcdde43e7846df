"""EDDY's correlated noise: a correlation matrix, exact N(0, I) per sample, look-alikes anti-correlated, and an
ancestral chain whose every sample keeps the unguided law while the batch spreads."""
import math

import pytest
import torch

from guidance.eddy import (correlate, correlation_root, eddy_noise, kernel_weights,
                                       noise_correlation, uniform_weights)
from guidance.sampling import karras_sigmas, sample_euler_ancestral


def random_weights(n, seed=0):
    e = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed))
    return kernel_weights(e)


@pytest.mark.parametrize("strength", [-1.0, -0.3, 0.5, 1.0])
def test_correlation_matrix_has_unit_diagonal_and_bounded_spectrum(strength):
    corr = noise_correlation(random_weights(6), strength)
    torch.testing.assert_close(corr, corr.t())
    torch.testing.assert_close(corr.diagonal(), torch.ones(6, dtype=torch.float64))
    values = torch.linalg.eigvalsh(corr)
    assert values.min() >= 1 - abs(strength) - 1e-12 and values.max() <= 1 + abs(strength) + 1e-12


def test_strength_outside_the_unit_interval_is_refused_with_its_value():
    with pytest.raises(ValueError, match="1.5"):
        noise_correlation(uniform_weights(3), 1.5)


@pytest.mark.parametrize("strength", [0.4, 1.0])
def test_root_reproduces_the_correlation_and_keeps_unit_rows(strength):
    corr = noise_correlation(random_weights(5, seed=3), strength)
    root = correlation_root(corr)
    torch.testing.assert_close(root @ root.t(), corr, atol=1e-7, rtol=0)
    torch.testing.assert_close(root.norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_equal_weights_at_full_strength_is_the_centred_noise():
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = math.sqrt(4 / 3) * (z - z.mean(0, keepdim=True))
    torch.testing.assert_close(eddy_noise(z, 1.0), expected, atol=1e-5, rtol=0)


def test_batch_of_one_and_zero_strength_leave_the_noise_alone():
    z = torch.randn(1, 4, 8, 8)
    assert eddy_noise(z, 1.0, torch.randn(1, 3)) is z
    z4 = torch.randn(4, 4, 8, 8)
    assert eddy_noise(z4, 0.0, torch.randn(4, 3)) is z4


def test_permuting_the_batch_permutes_the_noise():
    gen = torch.Generator().manual_seed(2)
    z, e = torch.randn(5, 2, 4, 4, generator=gen), torch.randn(5, 6, generator=gen)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(eddy_noise(z[perm], 0.8, e[perm]), eddy_noise(z, 0.8, e)[perm], atol=1e-5, rtol=0)


def test_look_alike_pair_gets_the_most_negative_correlation():
    e = torch.tensor([[0.0, 0.0], [0.1, 0.0], [3.0, 0.0], [0.0, 3.0]])
    corr = noise_correlation(kernel_weights(e), 1.0)
    assert corr[0, 1] < -0.5
    assert corr[0, 1] < corr[0, 2] and corr[0, 1] < corr[0, 3] and corr[0, 1] < corr[2, 3]


def test_each_sample_draws_standard_normal_noise_with_the_target_cross_correlation():
    e = torch.tensor([[0.0, 0.0], [0.2, 0.0], [2.0, 1.0], [0.0, 2.5]])
    z = torch.randn(4, 200_000, generator=torch.Generator().manual_seed(4))
    xi = eddy_noise(z, 1.0, e).double()
    corr = noise_correlation(kernel_weights(e), 1.0)
    tol = 5 / math.sqrt(200_000)
    assert (xi.mean(1).abs() < tol).all()
    assert ((xi.var(1) - 1).abs() < 5 * math.sqrt(2 / 200_000)).all()
    torch.testing.assert_close(torch.corrcoef(xi), corr, atol=tol, rtol=0)


def test_correlate_checks_the_batch_size():
    with pytest.raises(ValueError, match="noise batch 3"):
        correlate(torch.randn(3, 4), torch.eye(4, dtype=torch.float64))


# -- an ancestral chain on a 1-D two-mode mixture with the exact denoiser ---------------------------------------

MEANS, STD = torch.tensor([-1.5, 2.0], dtype=torch.float64), 0.4


def mixture_denoiser(x, sigma):
    s2 = float(sigma.flatten()[0]) ** 2
    var = STD ** 2 + s2
    resp = torch.softmax(-(x[..., None] - MEANS).square() / (2 * var), -1)
    return (resp * (STD ** 2 * x[..., None] + s2 * MEANS) / var).sum(-1)


def chain(batches, n, strength):
    gen = torch.Generator().manual_seed(11)
    start = torch.randn(batches * n, 1, generator=gen, dtype=torch.float64) * 20.0
    sigmas = karras_sigmas(30, 0.01, 20.0).double()

    def correlate_draw(z, denoised, sigma):
        zb, db = z.reshape(batches, n, 1), denoised.reshape(batches, n, 1)
        return torch.stack([eddy_noise(zb[b], strength, db[b]) for b in range(batches)]).reshape(z.shape)
    noise_gen = torch.Generator().manual_seed(12)
    out = sample_euler_ancestral(mixture_denoiser, start, sigmas, generator=noise_gen,
                                 correlate=None if strength == 0 else correlate_draw)
    return out.reshape(batches, n)


def ks_statistic(a, b):
    grid = torch.cat([a, b]).sort().values
    cdf = lambda s: torch.searchsorted(s.sort().values, grid, right=True).double() / len(s)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


def test_correlated_chain_keeps_every_sample_law_and_spreads_the_batch():
    batches, n = 1500, 4
    plain, eddy = chain(batches, n, 0.0), chain(batches, n, 1.0)
    spread = lambda x: float(torch.cdist(x[..., None], x[..., None]).sum() / (batches * n * (n - 1)))  # noqa: E731
    assert spread(eddy) > 1.08 * spread(plain)
    # two-sample KS at the 1% level for 6000 vs 6000 samples: 1.63 * sqrt(2 / 6000) = 0.030
    assert ks_statistic(eddy.flatten(), plain.flatten()) < 0.030
    for position in range(n):                           # every slot of the batch, not only the pooled law
        assert ks_statistic(eddy[:, position], plain[:, position]) < 1.63 * math.sqrt(2 / batches)


def test_blend_interpolates_between_independent_and_coupled_noise_with_unit_variance():
    from guidance.eddy import blend
    from guidance.coupling import couple_noise
    gen = torch.Generator().manual_seed(9)
    w, z = torch.randn(4, 1, 64, 64, generator=gen), torch.randn(4, 1, 64, 64, generator=gen)
    coupled = couple_noise(z, 2)
    assert blend(w, coupled, 1.0) is coupled
    torch.testing.assert_close(blend(w, coupled, 0.0), w)
    draws = torch.randn(4000, 4, 1, 8, 8, generator=gen), torch.randn(4000, 4, 1, 8, 8, generator=gen)
    mixed = torch.stack([blend(a, couple_noise(b, 2), 0.6) for a, b in zip(*draws)])   # [4000, 4, 1, 8, 8]
    pooled = mixed.reshape(4000, 4, 1, 2, 4, 2, 4).sum((4, 6)).flatten(2) / 4            # orthonormal 2x2 coordinates
    assert abs(float(pooled.var()) - 1) < 0.03 and abs(float(mixed.var()) - 1) < 0.01
    inner = (pooled[:, 0] * pooled[:, 1]).sum(-1).mean() / pooled.shape[-1]              # E <c_0, c_1> / m
    assert -0.6 * 0.35 < float(inner) < -0.6 * 0.22                                       # s x (design: -0.29)
    with pytest.raises(ValueError, match="-0.5"):
        blend(w, coupled, -0.5)
