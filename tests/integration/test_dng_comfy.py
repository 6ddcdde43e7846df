"""Dynamic Negative Guidance inside the real ComfyUI (tiny random SD1.5-config model, CPU)."""
import math

import pytest
import torch

import shield_harness as h

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc"]
STEPS = 6
BATCH = 2


def dng_kwargs(**over):
    kw = dict(scale=4.0, prior=0.3, temperature=0.2, offset=0.002, p_max=0.9, p_min=1e-6,
              start_percent=0.0, end_percent=1.0, mode="dynamic")
    kw.update(over)
    return kw


@pytest.fixture(scope="module")
def dng_nodes(pack):
    return h.pack_submodule("nodes.dng_nodes")


@pytest.fixture(scope="module")
def custom_sampler(comfy_nodes):
    import comfy_extras.nodes_custom_sampler as ncs
    return ncs


def counting(model):
    """Clone whose diffusion-model calls are recorded as batch sizes (an APPLY_MODEL wrapper, test only)."""
    import comfy.patcher_extension
    calls = []
    m = model.clone()

    def wrapper(executor, x, t, *args, **kwargs):
        calls.append(int(x.shape[0]))
        return executor(x, t, *args, **kwargs)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "dng_test_count", wrapper)
    return m, calls


def patch(dng_nodes, model, concept=None, **over):
    concept = concept if concept is not None else h.conditioning(3)
    return dng_nodes.DynamicNegativeGuidance().apply(model, concept=concept, **dng_kwargs(**over))


def ksample(comfy_nodes, model, sampler="euler", cfg=5.0, seed=11, steps=STEPS, negative=None):
    return h.ksample(comfy_nodes, model, h.empty_latent(BATCH), seed=seed, steps=steps, cfg=cfg, sampler=sampler,
                     negative=negative)["samples"]


def custom_sample(custom_sampler, model, guider, sampler, seed=11, steps=STEPS):
    import comfy.samplers
    # the schedule KSampler uses (it drops the penultimate sigma for uni_pc, dpm_2, ...)
    sigmas = comfy.samplers.KSampler(model, steps, "cpu", sampler=sampler, scheduler="normal").sigmas
    out = custom_sampler.SamplerCustomAdvanced().sample(custom_sampler.Noise_RandomNoise(seed), guider,
                                                        comfy.samplers.sampler_object(sampler), sigmas,
                                                        h.empty_latent(BATCH))
    return out[0]["samples"]


def scale_bounds(kw):
    lo = kw["scale"] * kw["p_min"] / (1 - kw["p_min"])
    hi = kw["scale"] * kw["p_max"] / (1 - kw["p_max"])
    return lo, hi


def check_trace(trace, kw, calls):
    assert len(trace.sigmas) == calls
    assert all(len(row) == BATCH for row in trace.posterior) and all(len(row) == BATCH for row in trace.scale)
    assert trace.posterior[0] == pytest.approx([kw["prior"]] * BATCH)
    lo, hi = scale_bounds(kw)
    for prow, srow in zip(trace.posterior, trace.scale):
        for p, s in zip(prow, srow):
            assert kw["p_min"] * (1 - 1e-9) <= p <= kw["p_max"] * (1 + 1e-9)
            assert lo * (1 - 1e-6) <= s <= hi * (1 + 1e-6)
            assert s == pytest.approx(kw["scale"] * p / (1 - p), rel=1e-6)
    assert trace.sigmas == sorted(trace.sigmas, reverse=True)


def test_nodes_registered_with_display_names(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ShieldedDynamicNegativeGuidance"] == "Dynamic Negative Guidance"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ShieldedDynamicNegativeGuider"] == "Dynamic Negative Guider"
    for key in ("ShieldedDynamicNegativeGuidance", "ShieldedDynamicNegativeGuider"):
        cls = pack.NODE_CLASS_MAPPINGS[key]
        assert "DNG_REPORT" in cls.RETURN_TYPES
        for group in cls.INPUT_TYPES().values():
            for name, spec in group.items():
                assert spec[1].get("tooltip"), f"{key}.{name} has no tooltip"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_patch_one_call_per_step_with_all_conds(comfy_nodes, dng_nodes, tiny_model, sampler):
    plain_model, plain_calls = counting(tiny_model)
    plain = ksample(comfy_nodes, plain_model, sampler)
    counted, calls = counting(tiny_model)
    model, trace = patch(dng_nodes, counted)
    out = ksample(comfy_nodes, model, sampler)
    assert len(calls) == len(plain_calls) >= STEPS - 1          # no extra model call for the concept
    assert set(plain_calls) == {2 * BATCH} and set(calls) == {3 * BATCH}  # pos, neg, concept in one call
    check_trace(trace, dng_kwargs(), len(calls))
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, plain)                       # the guidance acted


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guider_matches_patch(comfy_nodes, dng_nodes, custom_sampler, tiny_model, sampler):
    kw = dng_kwargs()
    counted, calls = counting(tiny_model)
    guider, trace = dng_nodes.DynamicNegativeGuiderNode().get_guider(
        counted, h.conditioning(1), h.conditioning(2), 5.0, concept=h.conditioning(3), **kw)
    out_guider = custom_sample(custom_sampler, counted, guider, sampler)
    assert set(calls) == {3 * BATCH}
    check_trace(trace, kw, len(calls))
    model, trace_patch = patch(dng_nodes, tiny_model)
    out_patch = ksample(comfy_nodes, model, sampler)
    assert len(trace_patch.sigmas) == len(trace.sigmas)
    torch.testing.assert_close(out_guider, out_patch, rtol=1e-4, atol=1e-4)


class HandReferenceGuider:
    """Reference by hand: three separate denoised outputs combined as D_u + cfg (D_p - D_u) - lam0 (D_c - D_p)."""

    @staticmethod
    def build(model, positive, negative, concept, cfg, lam0):
        import comfy.samplers

        class Guider(comfy.samplers.CFGGuider):
            def predict_noise(self, x, timestep, model_options={}, seed=None):
                (d_p,) = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["positive"]], x, timestep, model_options)
                (d_u,) = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["negative"]], x, timestep, model_options)
                (d_c,) = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["concept"]], x, timestep, model_options)
                return d_u + cfg * (d_p - d_u) - lam0 * (d_c - d_p)

        g = Guider(model)
        g.inner_set_conds({"positive": positive, "negative": negative, "concept": concept})
        g.set_cfg(cfg)
        return g


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde"])
def test_constant_mode_is_classic_negative_prompting(comfy_nodes, dng_nodes, custom_sampler, tiny_model, sampler):
    lam0 = 2.5
    model, trace = patch(dng_nodes, tiny_model, mode="constant", scale=lam0)
    out = ksample(comfy_nodes, model, sampler)
    assert all(s == [lam0] * BATCH for s in trace.scale)
    ref_guider = HandReferenceGuider.build(tiny_model, h.conditioning(1), h.conditioning(2), h.conditioning(3), 5.0, lam0)
    ref = custom_sample(custom_sampler, tiny_model, ref_guider, sampler)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_constant_mode_at_cfg1_equals_plain_negative_prompt(comfy_nodes, dng_nodes, tiny_model):
    """cfg=1, constant lam0: D_p - lam0 (D_c - D_p) == KSampler(cfg = 1 + lam0, negative = concept)."""
    lam0 = 3.0
    model, _ = patch(dng_nodes, tiny_model, mode="constant", scale=lam0)
    out = ksample(comfy_nodes, model, "euler", cfg=1.0)
    ref = ksample(comfy_nodes, tiny_model, "euler", cfg=1.0 + lam0, negative=h.conditioning(3))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cfg1_batches_positive_and_concept_only(comfy_nodes, dng_nodes, tiny_model):
    counted, calls = counting(tiny_model)
    model, trace = patch(dng_nodes, counted)
    out = ksample(comfy_nodes, model, "euler", cfg=1.0)
    plain = ksample(comfy_nodes, tiny_model, "euler", cfg=1.0)
    assert calls == [2 * BATCH] * STEPS
    check_trace(trace, dng_kwargs(), STEPS)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)


def test_second_queue_run_starts_from_prior(comfy_nodes, dng_nodes, tiny_model):
    kw = dng_kwargs(prior=0.2, temperature=1.0, offset=0.0)
    model, trace = patch(dng_nodes, tiny_model, **{k: kw[k] for k in ("prior", "temperature", "offset")})
    first = ksample(comfy_nodes, model, "euler_ancestral", seed=5)
    post1 = [row[:] for row in trace.posterior]
    assert any(abs(p - 0.2) > 1e-3 for row in post1[1:] for p in row)   # the posterior moved during run 1
    second = ksample(comfy_nodes, model, "euler_ancestral", seed=5)      # same patched model, queued again
    assert trace.runs == 2 and len(trace.posterior) == len(post1)
    assert trace.posterior[0] == pytest.approx([0.2] * BATCH)
    assert sum(trace.posterior, []) == pytest.approx(sum(post1, []), rel=1e-9)  # nothing carried over
    torch.testing.assert_close(first, second)
    third = ksample(comfy_nodes, model, "euler", seed=6, steps=4)
    assert len(trace.sigmas) == 4 and trace.posterior[0] == pytest.approx([0.2] * BATCH)
    assert torch.isfinite(third).all()


def test_scale_stays_within_clamps_and_window(comfy_nodes, dng_nodes, tiny_model):
    kw = dng_kwargs(p_max=0.6, p_min=0.05, prior=0.5, offset=0.5, end_percent=0.5)
    model, trace = patch(dng_nodes, tiny_model, **kw)
    ksample(comfy_nodes, model, "dpmpp_2m_sde", steps=8)
    lo, hi = scale_bounds(kw)
    ms = tiny_model.get_model_object("model_sampling")
    sigma_end = ms.percent_to_sigma(0.5)
    for sigma, prow, srow in zip(trace.sigmas, trace.posterior, trace.scale):
        assert all(0.05 * (1 - 1e-9) <= p <= 0.6 * (1 + 1e-9) for p in prow)
        if sigma >= sigma_end:
            assert all(lo * (1 - 1e-6) <= s <= hi * (1 + 1e-6) for s in srow)
        else:
            assert srow == [0.0] * BATCH
    assert any(s == [0.0] * BATCH for s in trace.scale) and any(s != [0.0] * BATCH for s in trace.scale)


@pytest.mark.parametrize("concept,match", [
    (None, "input 'concept' is missing or empty"),
    ([], "input 'concept' is missing or empty"),
    ([[torch.zeros(1, 0, 64), {}]], "input 'concept' holds an empty conditioning tensor"),
])
def test_bad_concept_is_a_clear_error(dng_nodes, tiny_model, concept, match):
    with pytest.raises(ValueError, match=f"Dynamic Negative Guidance: {match}"):
        dng_nodes.DynamicNegativeGuidance().apply(tiny_model, concept=concept, **dng_kwargs())
    with pytest.raises(ValueError, match=f"Dynamic Negative Guider: {match}"):
        dng_nodes.DynamicNegativeGuiderNode().get_guider(tiny_model, h.conditioning(1), h.conditioning(2), 5.0,
                                                         concept=concept, **dng_kwargs())


@pytest.mark.parametrize("over,match", [
    (dict(prior=0.0), "input 'prior' must lie strictly between 0 and 1"),
    (dict(prior=1.0), "input 'prior' must lie strictly between 0 and 1"),
    (dict(prior=1.7), "input 'prior'"),
    (dict(p_min=0.5, p_max=0.5), "p_min < p_max"),
    (dict(p_min=0.9, p_max=0.3), "p_min < p_max"),
    (dict(start_percent=0.8, end_percent=0.2), "start_percent"),
])
def test_bad_settings_are_clear_errors(dng_nodes, tiny_model, over, match):
    with pytest.raises(ValueError, match=f"Dynamic Negative Guidance: .*{match}"):
        patch(dng_nodes, tiny_model, **over)
