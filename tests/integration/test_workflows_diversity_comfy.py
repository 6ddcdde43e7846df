"""Issue 12, diversity and DNG side, in the real hosts with tiny models of several families (model_families.py):

- item 5: EDDY blended at strength < 1 keeps a disabled (zero) starting noise at zero: KSamplerAdvanced two-pass
  second stage, add_noise 'disable', SamplerCustomAdvanced with DisableNoise;
- item 6: Particle Guidance on WAN video latents [B, C, T, H, W] in every space and mode;
- item 7: DNG on flow models (SD3, Flux, WAN) counts the first transition out of sigma = 1;
- item 8: a video shield set with another frame count is refused naming the frames;
- item 9: the DNG report fills when nodes clone the DNG-patched model downstream.
"""
import logging
import math

import pytest
import torch

import model_families as mf
import shield_harness as h

STEPS = 4
EDDY, EDDY_DRIFT, PG = "EDDY", "EDDY drift (paper form)", "particle guidance"


@pytest.fixture(scope="module")
def particle_nodes(pack):
    return h.pack_submodule("nodes.particle_nodes")


@pytest.fixture(scope="module")
def dng_nodes(pack):
    return h.pack_submodule("nodes.dng_nodes")


@pytest.fixture(scope="module")
def custom_sampler(comfy_nodes):
    import comfy_extras.nodes_custom_sampler as ncs
    return ncs


_MODELS = {}


def family_model(name):
    """One tiny model per family for the whole module (building them is the slow part)."""
    if name not in _MODELS:
        _MODELS[name] = mf.FAMILIES[name].model(seed=0)
    return _MODELS[name]


def particle(particle_nodes, model, mode=EDDY, strength=0.5, space="pooled NxN", start_coupling="auto",
             pool_size=2, end_percent=1.0):
    return particle_nodes.ParticleGuidance().apply(model, mode, strength, space, pool_size, 0.0, 0.0, end_percent,
                                                   start_coupling)[0]


def record_noise(model):
    """A SAMPLER_SAMPLE wrapper added after the node's (so it runs inside it): the noise the sampler receives."""
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append((args[4] if len(args) > 4 else kwargs["noise"]).detach().cpu().clone())
        return executor(*args, **kwargs)
    model.add_wrapper_with_key("sampler_sample", "test_record_noise", wrapper)
    return seen


# -- item 5: a disabled noise stays zero -----------------------------------------------------------------------

def advanced(comfy_nodes, family, model, latent, add_noise, start, end, leftover, steps=2 * STEPS, seed=4):
    return comfy_nodes.KSamplerAdvanced().sample(model, add_noise, seed, steps, family.cfg, "euler", family.scheduler,
                                                 family.conditioning(1), family.conditioning(2), latent, start, end,
                                                 leftover)[0]


@pytest.mark.parametrize("family", ["sd15", "sd3"])
@pytest.mark.parametrize("strength,coupling", [(0.5, "auto"), (0.3, "spread 2x2"), (0.5, "independent")])
def test_eddy_keeps_the_second_stage_of_a_two_pass_graph_noise_free(comfy_nodes, particle_nodes, family, strength,
                                                                    coupling):
    """KSamplerAdvanced 0..4 (noise, leftover noise) -> KSamplerAdvanced 4..8 with add_noise 'disable': the second
    stage through EDDY (strength < 1) is bit-identical to the plain second stage (euler adds no fresh noise)."""
    fam, base = mf.FAMILIES[family], family_model(family)
    first = advanced(comfy_nodes, fam, base, fam.empty_latent(3), "enable", 0, STEPS, "enable")
    plain = advanced(comfy_nodes, fam, base, first, "disable", STEPS, 2 * STEPS, "disable")
    model = particle(particle_nodes, base, strength=strength, start_coupling=coupling)
    seen = record_noise(model)
    second = advanced(comfy_nodes, fam, model, first, "disable", STEPS, 2 * STEPS, "disable")
    assert torch.isfinite(plain["samples"]).all()
    assert len(seen) == 1 and not seen[0].any()                  # the sampler got the zero noise
    assert torch.equal(second["samples"], plain["samples"])


def test_eddy_keeps_add_noise_disable_from_step_zero(comfy_nodes, particle_nodes):
    fam, base = mf.FAMILIES["sd15"], family_model("sd15")
    start = fam.random_latent(3, seed=9)
    plain = advanced(comfy_nodes, fam, base, start, "disable", 0, STEPS, "disable", steps=STEPS)
    model = particle(particle_nodes, base, strength=0.5)
    guided = advanced(comfy_nodes, fam, model, start, "disable", 0, STEPS, "disable", steps=STEPS)
    assert torch.equal(guided["samples"], plain["samples"])


def test_eddy_keeps_disable_noise_zero_in_sampler_custom_advanced(comfy_nodes, particle_nodes, custom_sampler,
                                                                  caplog):
    import comfy.samplers
    fam, base = mf.FAMILIES["sd15"], family_model("sd15")
    latent = fam.random_latent(3, seed=10)

    def run(model):
        guider = custom_sampler.CFGGuider().get_guider(model, fam.conditioning(1), fam.conditioning(2), fam.cfg)[0]
        sigmas = custom_sampler.BasicScheduler().get_sigmas(model, fam.scheduler, STEPS, 0.6)[0]
        return custom_sampler.SamplerCustomAdvanced().sample(custom_sampler.DisableNoise().get_noise()[0], guider,
                                                             comfy.samplers.sampler_object("euler"), sigmas,
                                                             latent)[0]["samples"]
    plain = run(base)
    with caplog.at_level(logging.INFO, logger="shielded_sampling"):
        guided = run(particle(particle_nodes, base, strength=0.4))
    assert torch.equal(guided, plain)
    assert any("starting noise is zero" in r.getMessage() for r in caplog.records)


def test_eddy_still_blends_a_real_starting_noise(comfy_nodes, particle_nodes):
    """Control: with noise enabled the same EDDY setting does change the batch (the fix is not a no-op switch)."""
    fam, base = mf.FAMILIES["sd15"], family_model("sd15")
    plain = advanced(comfy_nodes, fam, base, fam.empty_latent(3), "enable", 0, STEPS, "disable", steps=STEPS)
    model = particle(particle_nodes, base, strength=0.5)
    guided = advanced(comfy_nodes, fam, model, fam.empty_latent(3), "enable", 0, STEPS, "disable", steps=STEPS)
    assert not torch.allclose(guided["samples"], plain["samples"])


# -- item 6: video latents -----------------------------------------------------------------------------------

VIDEO_CASES = [
    (PG, 0.5, "pooled NxN", "auto"), (PG, 0.5, "colour", "auto"), (PG, 0.5, "edges", "auto"),
    (PG, 0.5, "latent", "auto"), (EDDY, 0.8, "pooled NxN", "independent"), (EDDY, 0.8, "edges", "independent"),
    (EDDY, 1.0, "pooled NxN", "auto"), (EDDY, 0.5, "colour", "spread 2x2"), (EDDY_DRIFT, 0.5, "pooled NxN", "auto"),
    (EDDY_DRIFT, 0.5, "edges", "independent"),
]


@pytest.mark.parametrize("mode,strength,space,coupling", VIDEO_CASES)
def test_particle_guidance_runs_on_wan_video_latents(comfy_nodes, particle_nodes, mode, strength, space, coupling):
    fam, base = mf.FAMILIES["wan21"], family_model("wan21")
    sampler = "euler_ancestral" if mode == EDDY else "euler"
    plain = mf.ksample(comfy_nodes, fam, base, fam.empty_latent(3), seed=2, steps=STEPS, sampler=sampler)
    model = particle(particle_nodes, base, mode=mode, strength=strength, space=space, start_coupling=coupling)
    guided = mf.ksample(comfy_nodes, fam, model, fam.empty_latent(3), seed=2, steps=STEPS, sampler=sampler)
    assert guided["samples"].shape == plain["samples"].shape == fam.latent_shape(3)
    assert torch.isfinite(guided["samples"]).all()
    assert not torch.allclose(guided["samples"], plain["samples"])        # the node acted on the video


def test_particle_guidance_spreads_a_video_batch(comfy_nodes, particle_nodes):
    fam, base = mf.FAMILIES["wan21"], family_model("wan21")

    def spread(latent):
        return float(torch.pdist(latent["samples"].flatten(1).double()).mean())
    plain = mf.ksample(comfy_nodes, fam, base, fam.empty_latent(4), seed=3, steps=STEPS)
    model = particle(particle_nodes, base, mode=PG, strength=2.0, space="pooled NxN")
    guided = mf.ksample(comfy_nodes, fam, model, fam.empty_latent(4), seed=3, steps=STEPS)
    assert spread(guided) > 1.05 * spread(plain)


def test_a_latent_no_space_can_embed_is_refused_before_sampling(particle_nodes):
    """Any rank but images/videos (e.g. audio [N, C, L]) is refused at the run's start, naming node, input, fix."""
    model = particle(particle_nodes, family_model("sd15"), mode=PG, space="pooled NxN")
    patch = model.model_options["sampler_post_cfg_function"][-1]
    with pytest.raises(ValueError, match=r"Particle Guidance: input 'space' is 'pooled NxN'.*shape \(2, 8, 33\).*"
                                         r"set space to 'latent'"):
        patch.settings.check_latent(torch.zeros(2, 8, 33))
    patch.settings.check_latent(torch.zeros(2, 16, 3, 4, 4))               # video: accepted


# -- item 7: DNG on flow models --------------------------------------------------------------------------------

def dng(dng_nodes, model, family, **over):
    kw = dict(scale=4.0, prior=0.05, temperature=0.0, offset=0.01, p_max=0.999, p_min=1e-9, start_percent=0.0,
              end_percent=1.0, mode="dynamic")
    kw.update(over)
    return dng_nodes.DynamicNegativeGuidance().apply(model, concept=family.conditioning(3), **kw)


@pytest.mark.parametrize("family", ["sd3", "flux", "wan21"])
def test_dng_counts_the_first_transition_of_a_flow_schedule(comfy_nodes, dng_nodes, family):
    """The schedule starts at sigma = 1 (signal scale 0). With temperature 0 the first increment is the offset
    alone, delta / (2 s_vp^2) with s_vp^2 = sigma'^2 / (1 + sigma'^2) the VP variance of a transition out of pure
    noise (sigma' = s / (1 - s) in VE units): a closed form of the host's own sigmas. It was 0 (NaN, masked)."""
    fam = mf.FAMILIES[family]
    model, trace = dng(dng_nodes, family_model(family), fam)
    out = mf.ksample(comfy_nodes, fam, model, fam.empty_latent(2), seed=1, steps=STEPS)
    assert torch.isfinite(out["samples"]).all()
    assert trace.sigmas[0] == 1.0 and len(trace.sigmas) == STEPS
    s_next = trace.sigmas[1]
    sigma_ve = s_next / (1 - s_next)
    expected = math.log(0.05) + 0.01 * (1 + sigma_ve ** 2) / (2 * sigma_ve ** 2)
    for p in trace.posterior[1]:
        assert math.log(p) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("family", ["sd3", "wan21"])
def test_dng_first_flow_transition_weighs_the_evidence(comfy_nodes, dng_nodes, family):
    """With temperature 1 the first step's evidence moves each sample's posterior (it stayed at the prior)."""
    fam = mf.FAMILIES[family]
    model, trace = dng(dng_nodes, family_model(family), fam, temperature=1.0, offset=0.0, p_min=1e-300,
                       p_max=1 - 1e-12)
    mf.ksample(comfy_nodes, fam, model, fam.empty_latent(2), seed=1, steps=STEPS, sampler="euler_ancestral")
    assert trace.sigmas[0] == 1.0
    assert all(math.isfinite(p) and p != pytest.approx(0.05, rel=1e-9) for p in trace.posterior[1])


# -- item 8: video shield sets name the frames -------------------------------------------------------------

def spell_with_shields(spell_nodes, model, latents):
    shields = spell_nodes.LatentsToShieldSet().build({"samples": latents}, "clips")[0]
    return spell_nodes.ApplySpell().apply(model, radius=0.2, overcompensation=1.0, intra_batch=False, history=False,
                                          history_name="wfd", history_size=10, start_percent=0.0, end_percent=1.0,
                                          exact=False, shield_set=shields)[0]


def test_video_shield_set_with_another_frame_count_names_the_frames(comfy_nodes, spell_nodes):
    fam = mf.FAMILIES["wan21"]
    model = spell_with_shields(spell_nodes, family_model("wan21"), torch.randn(2, 16, 5, 4, 4))
    with pytest.raises(ValueError) as err:
        mf.ksample(comfy_nodes, fam, model, fam.empty_latent(2), steps=2)
    text = str(err.value)
    assert "Apply SPELL: input 'shield_set' holds latents of shape 16x5x4x4 but the sampled latent is 16x3x4x4" in text
    assert "shields have 5 latent frames but the sampled latent has 3 (C x T x H x W)" in text
    assert "frame count" in text
    assert "channels x height x width" not in text and "width/height" not in text


def test_image_shield_set_on_a_video_says_image_versus_video(comfy_nodes, spell_nodes):
    fam = mf.FAMILIES["wan21"]
    model = spell_with_shields(spell_nodes, family_model("wan21"), torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match=r"holds latents of shape 16x4x4 but the sampled latent is 16x3x4x4: shields "
                                         r"are image latents \(C x H x W\) but the sampled latent is video latents "
                                         r"\(C x T x H x W\)"):
        mf.ksample(comfy_nodes, fam, model, fam.empty_latent(2), steps=2)


# -- item 9: the DNG report fills after downstream clones ---------------------------------------------------

def test_dng_report_fills_after_downstream_clones(comfy_nodes, dng_nodes, particle_nodes, spell_nodes):
    """DNG -> Particle Guidance -> Apply SPELL -> KSampler: every node clones the model (deep-copying its options);
    the DNG trace returned by the DNG node is the one that fills, and the DNG Report node draws it."""
    report_nodes = h.pack_submodule("nodes.report_nodes")
    fam = mf.FAMILIES["sd15"]
    model, trace = dng(dng_nodes, family_model("sd15"), fam, temperature=0.2, offset=0.002)
    model = particle(particle_nodes, model, mode=PG, strength=0.2)
    model = spell_nodes.ApplySpell().apply(model, radius=0.2, overcompensation=1.0, intra_batch=True, history=False,
                                           history_name="wfd", history_size=10, start_percent=0.0, end_percent=1.0,
                                           exact=False)[0]
    mf.ksample(comfy_nodes, fam, model, fam.empty_latent(2), seed=1, steps=STEPS)
    assert trace.runs == 1 and len(trace.sigmas) == STEPS and all(len(row) == 2 for row in trace.posterior)
    out = report_nodes.DngReportNode().render(trace)
    assert "no sampling run recorded" not in out["result"][1] and f"{STEPS} steps x 2 samples" in out["result"][1]
