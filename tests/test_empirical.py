"""Exact empirical-score denoiser: memorisation limit, closed form, numerics."""
import math

import pytest
import torch

from evaluation.empirical import EmpiricalDenoiser


def data(n=50, d=16, seed=0):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_reproduces_the_nearest_training_point_as_sigma_goes_to_zero():
    y = data()
    model = EmpiricalDenoiser(y)
    x = y[[3, 17, 42]] + 1e-3 * torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    out = model(x, torch.full((3,), 1e-3))
    assert torch.allclose(out, y[[3, 17, 42]], atol=1e-6)


def test_matches_the_softmax_formula():
    y = data(30, 5).double()
    model = EmpiricalDenoiser(y, chunk_rows=7)           # several chunks: streaming log-sum-exp
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.3, 1.0, 10.0], dtype=torch.float64)
    w = torch.softmax(-torch.cdist(x, y).square() / (2 * sigma[:, None] ** 2), dim=1)
    assert torch.allclose(model(x, sigma), w @ y, atol=1e-10)


def test_large_sigma_gives_the_data_mean_and_tiny_sigma_does_not_overflow():
    y = data(40, 8).double()
    model = EmpiricalDenoiser(y, chunk_rows=16)
    x = torch.randn(2, 8, dtype=torch.float64)
    assert torch.allclose(model(x, torch.full((2,), 1e6, dtype=torch.float64)), y.mean(0).expand(2, 8), atol=1e-6)
    out = model(x * 100, torch.full((2,), 1e-6, dtype=torch.float64))
    assert torch.isfinite(out).all()
    nearest = torch.cdist(x * 100, y).argmin(1)
    assert torch.allclose(out, y[nearest])


def test_posterior_reports_a_concentrated_weight_near_a_training_point():
    y = data()
    _, lse, top = EmpiricalDenoiser(y).posterior(y[:2], torch.full((2,), 1e-2))
    assert torch.allclose(top, torch.ones(2, dtype=torch.float64))
    assert torch.isfinite(lse).all() and not math.isnan(top.sum().item())


def test_shapes_are_kept_and_bad_inputs_raise():
    y = data(10, 12).reshape(10, 3, 2, 2)
    model = EmpiricalDenoiser(y)
    assert model(torch.randn(2, 3, 2, 2), torch.ones(2)).shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="features"):
        model(torch.randn(2, 5), torch.ones(2))
    with pytest.raises(ValueError, match="sigma"):
        model(torch.randn(2, 3, 2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="non-empty"):
        EmpiricalDenoiser(torch.zeros(0, 4))
