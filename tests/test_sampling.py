"""Sampler loops against closed-form Gaussian denoisers; SpellWrapper bookkeeping."""
import math

import pytest
import torch

from guidance.sampling import (SpellWrapper, ddpm_sigmas, get_ancestral_step, karras_sigmas, sample,
                               sample_consistency, step_schedule)
from guidance.spell import sparse_repellency
from guidance import spell_record as nodes_report

MU, S = 1.5, 0.7          # data distribution N(MU, S^2) per coordinate


def gaussian_denoiser(x, sigma):
    """E[x0 | x] for x0 ~ N(MU, S^2), x = x0 + sigma * eps."""
    w = S ** 2 / (S ** 2 + sigma.reshape(-1, *([1] * (x.dim() - 1))) ** 2)
    return MU + w * (x - MU)


def gaussian_consistency(x, sigma):
    """Probability-flow ODE map from sigma to 0 for the same Gaussian (a perfect consistency function)."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return MU + S / torch.sqrt(S ** 2 + s ** 2) * (x - MU)


def noise(n=6000, d=2, seed=0):
    """Unit noise standardised per column, so deterministic samplers are tested without sampling error."""
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean(0)) / z.std(0)


@pytest.mark.parametrize("sampler,steps", [("euler", 200), ("heun", 40), ("euler_ancestral", 800), ("consistency", 4)])
def test_samplers_draw_the_gaussian(sampler, steps):
    """Euler-ancestral is first order in the step size (variance 0.386 at 50 steps, 0.464 at 200): 800 steps."""
    model = gaussian_consistency if sampler == "consistency" else gaussian_denoiser
    sigmas = karras_sigmas(steps, 0.002, 80.0).double()
    kw = {"generator": torch.Generator().manual_seed(1)} if sampler in ("euler_ancestral", "consistency") else {}
    out = sample(model, noise(), sigmas, sampler=sampler, **kw)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.var().item() == pytest.approx(S ** 2, rel=0.04)


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2)])
def test_ode_samplers_converge_to_the_exact_solution_at_their_order(sampler, order):
    x_t = noise(200, 3)
    exact = MU + S / math.sqrt(S ** 2 + 80.0 ** 2) * (x_t * 80.0 - MU)
    err = [(sample(gaussian_denoiser, x_t, karras_sigmas(n, 0.002, 80.0).double(), sampler=sampler) - exact)
           .abs().max().item() for n in (30, 60)]
    assert err[1] < (0.5 ** order) * 1.25 * err[0]      # halving the step divides the error by ~2^order
    assert err[1] < (0.01 if order == 2 else 0.12)


def test_consistency_single_step_is_the_consistency_map():
    x_t = noise(10, 3)
    out = sample_consistency(gaussian_consistency, x_t * 80.0, torch.tensor([80.0, 0.0], dtype=torch.float64))
    assert torch.allclose(out, gaussian_consistency(x_t * 80.0, torch.tensor([80.0], dtype=torch.float64)))


def test_karras_sigmas_endpoints_and_order():
    s = karras_sigmas(10, 0.002, 80.0)
    assert s.shape == (11,) and s[0].item() == pytest.approx(80.0) and s[9].item() == pytest.approx(0.002)
    assert s[10] == 0 and (s[1:] <= s[:-1]).all()


def test_ddpm_sigmas_match_alpha_bar():
    s = ddpm_sigmas(1000, 0.0001, 0.02, schedule="linear")
    betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    abar_last = torch.prod(1 - betas)
    assert s[0].item() == pytest.approx(math.sqrt((1 - abar_last) / abar_last), rel=1e-5)
    assert s[-2].item() == pytest.approx(math.sqrt(0.0001 / 0.9999), rel=1e-4)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(10, 80.0, 1.0)
    with pytest.raises(ValueError, match="non-increasing"):
        sample(gaussian_denoiser, noise(4), torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="sampler"):
        sample(gaussian_denoiser, noise(4), torch.tensor([1.0, 0.0]), sampler="dpm")


def test_ancestral_step_splits_variance():
    down, up = get_ancestral_step(10.0, 5.0)
    assert down ** 2 + up ** 2 == pytest.approx(25.0)
    assert get_ancestral_step(10.0, 0.0) == (0.0, 0.0)


def point_model(target):
    """A denoiser that always predicts ``target`` (a model memorising one image)."""
    return lambda x, sigma: target.expand_as(x).clone()


def test_spell_wrapper_pushes_final_sample_out_of_the_shield_and_records_steps():
    target = torch.zeros(1, 4)
    shield = torch.tensor([[0.5, 0.0, 0.0, 0.0]])
    wrapped = SpellWrapper(point_model(target), radius=2.0, shields=shield)
    sigmas = karras_sigmas(5, 0.01, 10.0)
    out = sample(wrapped, torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), sigmas)
    assert torch.allclose((out - shield).norm(dim=1), torch.full((3,), 2.0), atol=1e-4)
    assert len(wrapped.runs) == 1 and len(wrapped.runs[0].steps) == 5
    assert wrapped.runs[0].active_matrix().all()
    assert wrapped.runs[0].corrected_samples().tolist() == [True, True, True]


def test_spell_wrapper_history_repels_later_runs_from_earlier_outputs():
    model = point_model(torch.zeros(1, 4))
    wrapped = SpellWrapper(model, radius=1.0, history=True)
    sigmas = karras_sigmas(4, 0.01, 10.0)
    first = sample(wrapped, torch.randn(1, 4), sigmas)
    assert torch.equal(first, torch.zeros(1, 4))            # nothing to repel from yet
    second = sample(wrapped, torch.randn(1, 4), sigmas)
    assert (second - first).norm().item() == pytest.approx(1.0, abs=1e-4)
    assert len(wrapped.runs) == 2 and not wrapped.runs[0].corrected_samples().any()
    assert wrapped.runs[1].corrected_samples().all()


def test_spell_wrapper_emits_the_nodes_report_with_step_and_output_records():
    target = torch.zeros(1, 4)
    shield = torch.tensor([[0.5, 0.0, 0.0, 0.0]])
    wrapped = SpellWrapper(point_model(target), radius=2.0, shields=shield, overcompensation=1.5)
    sigmas = karras_sigmas(3, 0.01, 10.0)
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    sample(wrapped, noise, sigmas)
    rep = wrapped.runs[-1]
    assert type(rep) is nodes_report.SpellReport                    # the very type the nodes and the charts use
    assert (rep.radius, rep.radius_rms, rep.overcompensation, rep.elements) == (2.0, 1.0, 1.5, 4)
    assert (rep.shield_count, rep.history_count, rep.intra_batch) == (1, 0, False)
    assert rep.sigmas == sigmas[:-1].tolist() and [s.step for s in rep.steps] == [0, 1, 2]
    # the first evaluation is recorded exactly as the nodes record the same correction
    x0_hat = target.expand(2, 4).clone()
    direct = sparse_repellency(x0_hat, 2.0, shields=shield, overcompensation=1.5)
    want, _ = nodes_report.step_record(0, float(sigmas[0]), x0_hat, noise * sigmas[0], direct)
    assert rep.steps[0] == want and want.active == [True, True] and want.corrected == 2
    # the Euler step to sigma 0 returns the corrected prediction: 0.5 + 1.5 * (2 - 0.5) from shield 0
    assert [(o.index, o.nearest_shield, o.repelled) for o in rep.outputs] == [(0, 0, True), (1, 0, True)]
    assert [o.distance for o in rep.outputs] == pytest.approx([2.75, 2.75], abs=1e-5)


def test_spell_wrapper_report_of_a_schedule_and_of_history():
    model = point_model(torch.zeros(1, 4))
    wrapped = SpellWrapper(model, radius=lambda s: 1.0 if s > 1.0 else 0.0, history=True)
    sigmas = karras_sigmas(4, 0.01, 10.0)
    sample(wrapped, torch.randn(1, 4), sigmas)
    sample(wrapped, torch.randn(1, 4), sigmas)
    first, second = wrapped.runs
    assert first.radius == 1.0 and first.radius_rms == 0.5 and first.outputs[0].distance == math.inf
    assert (second.shield_count, second.history_count) == (0, 1)
    off = [s for s in second.steps if s.sigma <= 1.0]
    assert off and all(s.rounds == 0 and s.active == [False] for s in off)
    assert second.active_matrix().tolist() == [[s.sigma > 1.0] for s in second.steps]
    # moved while the radius was on, then back onto the remembered output once the schedule switched SPELL off:
    # the report says so instead of counting the sample as protected
    out = second.outputs[0]
    assert (out.nearest_shield, out.repelled, out.distance) == (-1, True, 0.0)
    assert "1/1 outputs repelled, 1 inside a shield" in second.summary()


def test_zero_radius_schedule_leaves_the_sampler_unchanged():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    sigmas = karras_sigmas(6, 0.01, 10.0)
    shields = torch.full((1, 3), MU)
    plain = sample(gaussian_denoiser, x, sigmas)
    off = sample(SpellWrapper(gaussian_denoiser, radius=lambda s: 0.0, shields=shields), x, sigmas)
    assert torch.equal(plain, off)


def test_step_schedule():
    fn = step_schedule([8.0, 4.0, 2.0], [5.0, 1.0])
    assert [fn(10.0), fn(5.0), fn(3.0), fn(0.5)] == [8.0, 8.0, 4.0, 2.0]
    with pytest.raises(ValueError):
        step_schedule([1.0], [1.0])


# ----------------------------------------------------------------------------- the demo's terrain model

def terrain_or_skip():
    from demo import terrain_model
    reason = terrain_model.unavailable_reason()
    if reason:
        pytest.skip(f"terrain model absent: {reason}")
    return terrain_model


def test_terrain_labels_and_renderer_without_the_model():
    from demo.terrain_model import difficulty_labels, render, to_heights
    assert difficulty_labels(1, 2).tolist() == [0.0, 0.0] and difficulty_labels([100], 1).tolist() == [1.0]
    with pytest.raises(ValueError, match="1..100"):
        difficulty_labels(0, 1)
    x = torch.linspace(-1, 1, 2 * 128 * 128).reshape(2, 1, 128, 128)
    h = to_heights(x)
    assert h.shape == (2, 128, 128) and h.min() == 0.0
    img = render(x)
    assert img.shape == (2, 128, 128, 3) and img.dtype.name == "uint8"


def test_terrain_model_is_a_denoiser_for_the_consistency_sampler():
    tm = terrain_or_skip()
    model = tm.TerrainDenoiser(difficulty=50, threads=1)
    noise = torch.randn(1, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    out = sample(model, noise, torch.tensor([80.0, 40.0, 0.0]), sampler="consistency",
                 generator=torch.Generator().manual_seed(1))
    assert out.shape == (1, 1, 128, 128) and model.calls == 2
    assert out.min() >= -1.0001 and out.max() <= 1.0001 and out.std() > 0.01
    with pytest.raises(ValueError, match="128"):
        model(torch.zeros(1, 1, 64, 64), torch.ones(1))
