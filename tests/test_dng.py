"""DNG math on Gaussian mixtures with closed-form scores (paper Fig. 1, Appendix B, Algorithm 2)."""
import math

import pytest
import torch

from benchmarks.dng_mixture import (
    DngDenoiser, GaussianMixture, forbidden_rate, tracking_error,
)
from guidance.dng import (
    DngParams, DngTrace, PosteriorTracker, clamp_log_posterior, ddpm_step_mean, ddpm_step_variance, dng_scale,
    log_posterior_increment, negative_guidance, negative_prompting,
)
from guidance.sampling import karras_sigmas, sample_euler_ancestral

MIX_1D = GaussianMixture.make([0.35, 0.3, 0.35], [-3.0, 0.0, 3.0], [0.6, 0.6, 0.6])
MIX_2D = GaussianMixture.make([0.2, 0.5, 0.3], [[-2.0, 1.0], [1.5, 0.5], [0.0, -2.5]], [0.5, 0.8, 0.4])


@pytest.mark.parametrize("mix,forbidden", [(MIX_1D, 1), (MIX_1D, 0), (MIX_2D, 1), (MIX_2D, 2)])
@pytest.mark.parametrize("sigma", [0.05, 0.7, 3.0, 20.0])
def test_exact_posterior_dng_is_cfg_toward_complement(mix, forbidden, sigma):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(256, mix.dim, generator=gen, dtype=torch.float64) * (2.0 + sigma))
    d_base = mix.denoiser(x, sigma)
    d_neg = mix.denoiser(x, sigma, subset=[forbidden])
    p = mix.posterior(x, sigma, forbidden)
    keep = p < 1 - 1e-3  # as p -> 1, rounding of 1 - p is amplified by p / (1 - p)^2: not the method's error
    assert keep.double().mean() > 0.4
    x, d_base, d_neg, p = x[keep], d_base[keep], d_neg[keep], p[keep]
    guided = negative_guidance(d_base, d_neg, dng_scale(p, 1.0))
    complement = [k for k in range(len(mix.weights)) if k != forbidden]
    target = mix.denoiser(x, sigma, subset=complement)
    # scores: (D - x) / sigma^2; compare in score units so that large sigma does not hide errors
    err = ((guided - target) / sigma ** 2).abs().max().item()
    scale = (target - x).abs().max().item() / sigma ** 2
    assert err <= 1e-8 * max(1.0, scale), (err, scale)  # float64


def test_exact_posterior_dng_samples_the_target_and_np_does_not():
    params = DngParams(lam0=1.0, prior=0.3, tau=1.0, delta=0.0, p_min=1e-6, p_max=0.999)
    gen = torch.Generator().manual_seed(1)
    sigmas = karras_sigmas(60, sigma_min=0.002, sigma_max=20.0)
    x = torch.randn(4000, 1, generator=gen, dtype=torch.float64) * sigmas[0]
    out = sample_euler_ancestral(DngDenoiser(MIX_1D, 1, params, "exact", 4000), x.clone(), sigmas, generator=gen)
    assert forbidden_rate(MIX_1D, out, 1) < 0.012  # the target itself has ~0.6% mass nearer the middle mode
    side = out[out.reshape(-1).abs() > 1.5].reshape(-1)
    assert abs(side.abs().mean().item() - 3.0) < 0.1  # kept modes stay where they are
    np_params = DngParams(lam0=2.0, prior=0.3, tau=1.0, delta=0.0, p_min=1e-6, p_max=0.999, mode="constant")
    gen = torch.Generator().manual_seed(1)
    out_np = sample_euler_ancestral(DngDenoiser(MIX_1D, 1, np_params, "exact", 4000), x.clone(), sigmas, generator=gen)
    assert out_np.abs().mean().item() > 4.0  # NP at a safe scale pushes the kept modes far out


@pytest.mark.parametrize("mix,forbidden", [(MIX_1D, 1), (MIX_2D, 1)])
def test_tracked_posterior_follows_exact_along_chains(mix, forbidden):
    prior = float(mix.weights[forbidden])
    params = DngParams(lam0=1.0, prior=prior, tau=1.0, delta=0.0, p_min=1e-9, p_max=1 - 1e-6)
    gen = torch.Generator().manual_seed(2)
    sigmas = karras_sigmas(200, sigma_min=0.002, sigma_max=40.0)
    x = torch.randn(512, mix.dim, generator=gen, dtype=torch.float64) * sigmas[0]
    den = DngDenoiser(mix, forbidden, params, "tracked", 512)
    sample_euler_ancestral(den, x, sigmas, generator=gen)
    mean_err, p95_err = tracking_error(den.log)
    assert mean_err < 0.04 and p95_err < 0.12, (mean_err, p95_err)  # measured: 1-D ~0.01, 2-D ~0.022 / 0.057
    final_t, final_e = den.log[-1][1], den.log[-1][2]
    assert ((final_t > 0.5) == (final_e > 0.5)).double().mean() > 0.97


def test_mapping_reproduces_paper_ddpm_update():
    """The VE-coordinate update equals Algorithm 1 of the official code on a 1000-step linear-beta DDPM."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    gen = torch.Generator().manual_seed(3)
    tau, delta = 0.3, 4e-3
    for t in (999, 600, 200, 20, 1):
        x_vp = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
        eps_b = torch.randn(x_vp.shape, generator=gen, dtype=torch.float64)
        eps_n = eps_b + 0.3 * torch.randn(x_vp.shape, generator=gen, dtype=torch.float64)
        x_next_vp = torch.randn(x_vp.shape, generator=gen, dtype=torch.float64)
        # paper, VP coordinates
        mu_b = (x_vp - betas[t] / (1 - abar[t]).sqrt() * eps_b) / alphas[t].sqrt()
        mu_n = (x_vp - betas[t] / (1 - abar[t]).sqrt() * eps_n) / alphas[t].sqrt()
        var_vp = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
        diff = ((x_next_vp - mu_n) ** 2).flatten(1).sum(1) - ((x_next_vp - mu_b) ** 2).flatten(1).sum(1)
        paper = (-tau * diff + delta) / (2 * var_vp)
        # ours, VE coordinates as ComfyUI sees them
        sigma = ((1 - abar[t]) / abar[t]).sqrt()
        sigma_next = ((1 - abar[t - 1]) / abar[t - 1]).sqrt()
        x = x_vp / abar[t].sqrt()
        d_b = (x_vp - (1 - abar[t]).sqrt() * eps_b) / abar[t].sqrt()
        d_n = (x_vp - (1 - abar[t]).sqrt() * eps_n) / abar[t].sqrt()
        x_next = x_next_vp / abar[t - 1].sqrt()
        ours = log_posterior_increment(x_next, ddpm_step_mean(x, d_n, sigma, sigma_next),
                                       ddpm_step_mean(x, d_b, sigma, sigma_next),
                                       ddpm_step_variance(sigma, sigma_next).expand(4), tau, delta, sigma_next)
        torch.testing.assert_close(ours, paper, rtol=1e-9, atol=1e-9)


def test_ddpm_variance_matches_ancestral_noise():
    sigma, sigma_next = 3.0, 1.2
    s_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5  # euler_ancestral, eta = 1
    h = math.log(sigma / sigma_next)
    sde = sigma_next ** 2 * -math.expm1(-2 * h)  # dpmpp_2m_sde, eta = 1
    assert float(ddpm_step_variance(sigma, sigma_next)) == pytest.approx(s_up ** 2, rel=1e-12)
    assert float(ddpm_step_variance(sigma, sigma_next)) == pytest.approx(sde, rel=1e-12)


def test_tracker_is_staggered_and_starts_from_prior():
    params = DngParams(lam0=2.0, prior=0.1, tau=1.0, delta=0.0)
    tr = PosteriorTracker(params, batch=3)
    x = torch.randn(3, 4, 2, 2)
    d_b, d_n = torch.zeros_like(x), torch.ones_like(x)
    p0 = tr.observe(x, 5.0, d_b, d_n)
    torch.testing.assert_close(p0, torch.full((3,), 0.1, dtype=torch.float64))
    # a call at a non-decreasing sigma (heun's repeated sigma, a restart) changes nothing
    p1 = tr.observe(x + 1.0, 5.0, d_b, d_n)
    torch.testing.assert_close(p1, p0)
    # moving towards the negative mean raises the posterior, towards the base mean lowers it
    x_toward_neg = ddpm_step_mean(x + 1.0, d_n, 5.0, 4.0).float()
    x_toward_base = ddpm_step_mean(x + 1.0, d_b, 5.0, 4.0).float()
    up = PosteriorTracker(params, 3)
    up.observe(x + 1.0, 5.0, d_b, d_n)
    down = PosteriorTracker(params, 3)
    down.observe(x + 1.0, 5.0, d_b, d_n)
    assert bool((up.observe(torch.cat([x_toward_neg]), 4.0, d_b, d_n) > 0.1).all())
    assert bool((down.observe(x_toward_base, 4.0, d_b, d_n) < 0.1).all())


def test_offset_raises_posterior_and_clamps_hold():
    params = DngParams(lam0=1.0, prior=0.5, tau=0.0, delta=1.0, p_min=1e-3, p_max=0.8)
    tr = PosteriorTracker(params, 2)
    x = torch.zeros(2, 3)
    tr.observe(x, 2.0, x, x)
    p = tr.observe(x, 1.0, x, x)
    assert torch.allclose(p, torch.full((2,), 0.8, dtype=torch.float64))
    low = clamp_log_posterior(torch.tensor([-50.0, 0.0]), 1e-3, 0.8).exp()
    torch.testing.assert_close(low, torch.tensor([1e-3, 0.8]))


def test_scale_modes_and_np_baseline():
    p = torch.tensor([0.01, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(DngParams(lam0=3.0).scale(p), 3.0 * p / (1 - p))
    torch.testing.assert_close(DngParams(lam0=3.0, mode="constant").scale(p), torch.full_like(p, 3.0))
    base, neg = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(negative_prompting(base, neg, 2.0), base - 2.0 * (neg - base))
    lam = torch.tensor([0.0, 1.0, 2.0])
    torch.testing.assert_close(negative_guidance(base, neg, lam), base - lam[:, None] * (neg - base))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prior=0.0), "prior"), (dict(prior=1.0), "prior"), (dict(prior=-0.2), "prior"),
    (dict(p_min=0.5, p_max=0.5), "p_min"), (dict(p_min=0.9, p_max=0.5), "p_min"),
    (dict(mode="sometimes"), "mode"), (dict(lam0=-1.0), "lam0"), (dict(tau=float("nan")), "tau"),
])
def test_bad_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DngParams(**kwargs)


def test_trace_records_and_summarises():
    params = DngParams(lam0=4.0, prior=0.2)
    trace = DngTrace.for_params(params)
    assert "no sampling run" in trace.summary()
    trace.start_run()
    trace.record(14.6, torch.tensor([0.2, 0.3]), torch.tensor([1.0, 1.7]))
    trace.record(7.0, torch.tensor([0.25, 0.5]), torch.tensor([1.3, 4.0]))
    d = trace.to_dict()
    assert d["sigmas"] == [14.6, 7.0] and d["posterior"][1] == [0.25, 0.5] and d["scale"][1][1] == 4.0
    assert d["lam0"] == 4.0 and d["prior"] == 0.2 and d["mode"] == "dynamic"
    assert "2 steps x 2 samples" in trace.summary() and "peak scale 4" in trace.summary()
    trace.start_run()
    assert trace.sigmas == [] and trace.runs == 2


def flow_transition_reference(x0, t, s):
    """``q(x_s | x_t, x0)`` of a flow model (``x_u = (1 - u) x0 + u n``, Markov forward process) by Gaussian
    conditioning in raw coordinates, never dividing by the signal scale: ``(mean, variance)``."""
    a_t, a_s = 1 - t, 1 - s
    cov = (a_t / a_s) * s ** 2                     # Cov(x_s, x_t) per element; 0 at the endpoint t = 1
    return lambda x_t: (a_s * x0 + cov / t ** 2 * (x_t - a_t * x0), s ** 2 - cov ** 2 / t ** 2)


def test_flow_endpoint_transition_matches_gaussian_reference():
    """Issue 12 item 7: a flow schedule starts at sigma = 1 (alpha = 0). Every transition, the first included,
    must add the Bayes log-ratio of the two Gaussian transitions computed in raw flow coordinates (tau = 1) plus
    the offset over the VP variance; before the fix the first one was NaN, masked to 0."""
    gen = torch.Generator().manual_seed(12)
    ts = [1.0, 0.85, 0.6, 0.3, 0.1]
    tau, delta = 1.0, 0.01
    params = DngParams(lam0=1.0, prior=0.01, tau=tau, delta=delta, p_min=1e-300, p_max=1 - 1e-12)
    tracker = PosteriorTracker(params, batch=3)
    expected = torch.full((3,), math.log(0.01), dtype=torch.float64)
    prev = None
    for t in ts:
        x = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64)
        d_b = 0.2 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        d_n = d_b + 0.002 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        if prev is not None:
            x_t, t_prev, pb, pn = prev
            mean_n, var = flow_transition_reference(pn, t_prev, t)(x_t)
            mean_b, _ = flow_transition_reference(pb, t_prev, t)(x_t)
            log_ratio = (-((x - mean_n) ** 2).flatten(1).sum(1) + ((x - mean_b) ** 2).flatten(1).sum(1)) / (2 * var)
            var_vp = var / ((1 - t) ** 2 + t ** 2)       # the VP transition variance (unit total variance)
            expected = expected + tau * log_ratio + delta / (2 * var_vp)
        tracker.observe(x, torch.tensor([t], dtype=torch.float64), d_b, d_n, alpha=1 - t)
        assert torch.isfinite(tracker.log_p).all()
        assert bool((expected < math.log(params.p_max)).all()), (t, expected)  # no clamp hides a difference
        torch.testing.assert_close(tracker.log_p, expected, rtol=1e-10, atol=1e-10)
        prev = (x, t, d_b, d_n)
    assert float((tracker.log_p - math.log(0.01)).abs().min()) > 0


def test_flow_endpoint_is_the_limit_of_the_general_formula():
    """The transition out of sigma = 1 equals the limit of transitions out of sigma -> 1 (continuity)."""
    gen = torch.Generator().manual_seed(7)
    x, x_next = (torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    d_b = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    d_n = d_b + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def increment(t):
        tr = PosteriorTracker(DngParams(prior=0.5, tau=1.0, delta=0.0, p_min=1e-300, p_max=1 - 1e-12), 2)
        tr.observe(x, t, d_b, d_n, alpha=1 - t)
        tr.observe(x_next, 0.7, d_b, d_n, alpha=0.3)
        return tr.log_p - math.log(0.5)

    at_endpoint = increment(1.0)
    assert torch.isfinite(at_endpoint).all() and bool((at_endpoint != 0).all())
    torch.testing.assert_close(increment(1.0 - 1e-9), at_endpoint, rtol=1e-6, atol=1e-8)
    assert float(ddpm_step_variance(math.inf, 2.0)) == 4.0
    torch.testing.assert_close(ddpm_step_mean(torch.full_like(x, math.inf), d_n, math.inf, 2.0), d_n)
