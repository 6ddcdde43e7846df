"""Particle Guidance node inside the real ComfyUI sampler (tiny random SD1.5-config model, CPU)."""
import logging

import pytest
import torch

import shield_harness as h

SAMPLERS = ["euler", "dpmpp_2m", "euler_ancestral", "uni_pc"]
STEPS = 8
EDDY_DRIFT = "EDDY drift (paper form)"


@pytest.fixture(scope="module")
def particle_nodes(pack):
    return h.pack_submodule("nodes.particle_nodes")


def patched(particle_nodes, model, mode="particle guidance", strength=1.0, space="latent", pool_size=2,
            bandwidth=0.0, start_percent=0.0, end_percent=1.0, start_coupling="independent"):
    node = particle_nodes.ParticleGuidance()
    return node.apply(model, mode, strength, space, pool_size, bandwidth, start_percent, end_percent,
                      start_coupling)[0]


def mean_pairwise(latent):
    return float(torch.pdist(latent["samples"].flatten(1).double()).mean())


def test_node_is_registered(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ParticleGuidance"] == "Particle Guidance"


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("space", ["latent", "pooled NxN"])
def test_particle_guidance_moves_batch_apart(comfy_nodes, particle_nodes, tiny_model, sampler, space):
    plain = h.ksample(comfy_nodes, tiny_model, h.empty_latent(4), seed=3, steps=STEPS, sampler=sampler)
    model = patched(particle_nodes, tiny_model, strength=1.0, space=space)
    guided = h.ksample(comfy_nodes, model, h.empty_latent(4), seed=3, steps=STEPS, sampler=sampler)
    assert torch.isfinite(guided["samples"]).all()
    assert mean_pairwise(guided) > 1.1 * mean_pairwise(plain)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode", ["EDDY", EDDY_DRIFT])
def test_eddy_runs_and_changes_the_batch(comfy_nodes, particle_nodes, tiny_model, sampler, mode):
    plain = h.ksample(comfy_nodes, tiny_model, h.empty_latent(4), seed=3, steps=STEPS, sampler=sampler)
    model = patched(particle_nodes, tiny_model, mode=mode, strength=1.0, space="pooled NxN")
    guided = h.ksample(comfy_nodes, model, h.empty_latent(4), seed=3, steps=STEPS, sampler=sampler)
    assert torch.isfinite(guided["samples"]).all()
    assert not torch.allclose(guided["samples"], plain["samples"])


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode,strength", [("particle guidance", 2.0), ("EDDY", 1.0), (EDDY_DRIFT, 2.0)])
def test_batch_of_one_is_unchanged_and_logged_once(comfy_nodes, particle_nodes, tiny_model, sampler, mode,
                                                   strength, caplog):
    plain = h.ksample(comfy_nodes, tiny_model, h.empty_latent(1), seed=5, steps=STEPS, sampler=sampler)
    model = patched(particle_nodes, tiny_model, mode=mode, strength=strength)
    with caplog.at_level(logging.INFO, logger="shielded_sampling"):
        guided = h.ksample(comfy_nodes, model, h.empty_latent(1), seed=5, steps=STEPS, sampler=sampler)
    assert torch.equal(guided["samples"], plain["samples"])
    assert sum("batch size 1" in r.getMessage() for r in caplog.records) == 1


def test_empty_window_is_a_no_op(comfy_nodes, particle_nodes, tiny_model):
    plain = h.ksample(comfy_nodes, tiny_model, h.empty_latent(3), seed=2, steps=STEPS)
    model = patched(particle_nodes, tiny_model, strength=1.0, start_percent=1.0, end_percent=1.0)
    guided = h.ksample(comfy_nodes, model, h.empty_latent(3), seed=2, steps=STEPS)
    assert torch.equal(guided["samples"], plain["samples"])


def test_bad_input_names_node_and_input(particle_nodes, tiny_model):
    with pytest.raises(ValueError, match="Particle Guidance: inputs 'start_percent'/'end_percent'"):
        patched(particle_nodes, tiny_model, start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="Particle Guidance: input 'space'"):
        patched(particle_nodes, tiny_model, space="dino")
    with pytest.raises(ValueError, match=r"Particle Guidance: input 'strength' must lie in \[-1, 1\] in EDDY mode"):
        patched(particle_nodes, tiny_model, mode="EDDY", strength=2.0)
    with pytest.raises(ValueError, match="Particle Guidance: input 'start_coupling' must be 'independent'"):
        patched(particle_nodes, tiny_model, mode=EDDY_DRIFT, start_coupling="spread 2x2")
    with pytest.raises(ValueError, match=r"input 'strength' must lie in \[0, 1\] in EDDY mode with a spread"):
        patched(particle_nodes, tiny_model, mode="EDDY", strength=-0.5, start_coupling="auto")
    patched(particle_nodes, tiny_model, mode=EDDY_DRIFT, start_coupling="auto")      # auto = independent here
    patched(particle_nodes, tiny_model, mode="EDDY", strength=-0.5, start_coupling="independent")


def test_patch_survives_model_clone(particle_nodes, tiny_model):
    import copy
    model = patched(particle_nodes, tiny_model)
    fns = model.clone().model_options["sampler_post_cfg_function"]
    assert fns[-1] is model.model_options["sampler_post_cfg_function"][-1]
    assert copy.deepcopy(fns[-1]) is fns[-1]


# -- start coupling ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coupling(pack):
    return h.pack_submodule("guidance.coupling")


def record_noise(model):
    """A SAMPLER_SAMPLE wrapper added after the node's (so it runs inside it): the noise the sampler receives."""
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append(args[4].detach().cpu().clone())
        return executor(*args, **kwargs)
    model.add_wrapper_with_key("sampler_sample", "test_record_noise", wrapper)
    return seen


def coupled_messages(caplog):
    return sum("start noise coupled" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode,strength", [("particle guidance", 0.0), ("particle guidance", 1.0), ("EDDY", 1.0)])
def test_start_coupling_feeds_the_sampler_the_coupled_noise(comfy_nodes, particle_nodes, coupling, tiny_model,
                                                              sampler, mode, strength, caplog):
    import comfy.sample
    latent = h.empty_latent(4, size=64)                      # 8x8 latent: a 2x2 grid of 4x4 blocks, m = 16
    independent = patched(particle_nodes, tiny_model, mode=mode, strength=strength, space="pooled NxN")
    plain = h.ksample(comfy_nodes, independent, latent, seed=3, steps=STEPS, sampler=sampler)
    model = patched(particle_nodes, tiny_model, mode=mode, strength=strength, space="pooled NxN",
                    start_coupling="spread 2x2")
    seen = record_noise(model)
    with caplog.at_level(logging.INFO, logger="shielded_sampling"):
        out = h.ksample(comfy_nodes, model, latent, seed=3, steps=STEPS, sampler=sampler)
    assert coupled_messages(caplog) == 1
    assert torch.isfinite(out["samples"]).all()
    assert not torch.allclose(out["samples"], plain["samples"])
    noise = comfy.sample.prepare_noise(latent["samples"], 3)
    assert len(seen) == 1 and torch.equal(seen[0], coupling.couple_noise(noise, 2))
    c, r = coupling.project(seen[0], 2), coupling.project(noise, 2).norm(dim=1)
    d, _ = coupling.design(4, 16)
    torch.testing.assert_close(c @ c.t(), r[:, None] * r[None, :] * (d @ d.t()), rtol=0, atol=1e-4)
    residual = seen[0].double() - coupling.lift(c, noise.shape, 2)
    torch.testing.assert_close(residual, noise.double() - coupling.lift(coupling.project(noise, 2), noise.shape, 2),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_start_coupling_leaves_a_batch_of_one_unchanged(comfy_nodes, particle_nodes, tiny_model, sampler, caplog):
    plain = h.ksample(comfy_nodes, tiny_model, h.empty_latent(1), seed=5, steps=STEPS, sampler=sampler)
    model = patched(particle_nodes, tiny_model, strength=0.0, start_coupling="spread 1x1 (channel means)")
    with caplog.at_level(logging.INFO, logger="shielded_sampling"):
        out = h.ksample(comfy_nodes, model, h.empty_latent(1), seed=5, steps=STEPS, sampler=sampler)
    assert torch.equal(out["samples"], plain["samples"])
    assert sum("start coupling: batch size 1" in r.getMessage() for r in caplog.records) == 1
    assert coupled_messages(caplog) == 0


def test_start_coupling_logs_once_per_run_and_clamps_the_grid(comfy_nodes, particle_nodes, tiny_model, caplog):
    model = patched(particle_nodes, tiny_model, strength=0.0, start_coupling="spread 8x8")
    with caplog.at_level(logging.INFO, logger="shielded_sampling"):
        for _ in range(2):
            out = h.ksample(comfy_nodes, model, h.empty_latent(3), seed=2, steps=STEPS)   # 4x4 latent
    assert torch.isfinite(out["samples"]).all()
    msgs = [r.getMessage() for r in caplog.records if "start noise coupled" in r.getMessage()]
    assert len(msgs) == 2 and "4x4 grid (64 coordinates" in msgs[0]


def test_start_coupling_with_img2img_and_a_denoise_mask(comfy_nodes, particle_nodes, tiny_model):
    gen = torch.Generator().manual_seed(11)
    mask = torch.ones(1, 64, 64)
    mask[:, :, :32] = 0.0                                    # keep the left half of the image
    latent = {"samples": torch.randn(3, 4, 8, 8, generator=gen), "noise_mask": mask}
    model = patched(particle_nodes, tiny_model, strength=0.0, start_coupling="spread 2x2")
    for extra in ({"denoise": 0.6}, {}):
        plain = h.ksample(comfy_nodes, tiny_model, latent, seed=4, steps=STEPS, **extra)["samples"]
        out = h.ksample(comfy_nodes, model, latent, seed=4, steps=STEPS, **extra)["samples"]
        assert torch.isfinite(out).all()
        assert not torch.allclose(out[..., 4:], plain[..., 4:])                       # the painted half differs
        torch.testing.assert_close(out[..., :4], plain[..., :4], rtol=0, atol=1e-5)   # the kept half is kept
    no_mask = {"samples": latent["samples"]}
    plain = h.ksample(comfy_nodes, tiny_model, no_mask, seed=4, steps=STEPS, denoise=0.6)["samples"]
    out = h.ksample(comfy_nodes, model, no_mask, seed=4, steps=STEPS, denoise=0.6)["samples"]
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)


def test_start_coupling_bad_input_and_clone(particle_nodes, tiny_model):
    with pytest.raises(ValueError, match="Particle Guidance: input 'start_coupling'"):
        patched(particle_nodes, tiny_model, start_coupling="spread 3x3")
    model = patched(particle_nodes, tiny_model, start_coupling="spread 2x2")
    independent = patched(particle_nodes, tiny_model)       # its wrapper only checks the latent at the run's start
    assert list(independent.wrappers["sampler_sample"]) == [independent.model_options["sampler_post_cfg_function"][-1].key]
    wrappers = model.clone().wrappers["sampler_sample"]
    assert len(wrappers) == 1 and list(wrappers.values())[0] == list(model.wrappers["sampler_sample"].values())[0]


# -- EDDY: correlated noise ----------------------------------------------------------------------------------

def eddy_messages(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eddy_spreads_batches_of_stochastic_samplers(comfy_nodes, particle_nodes, tiny_model, sampler, seed,
                                                     caplog):
    """Kernel correlation of the whole noise: same raw noise streams, correlated (strength 1) vs practically
    uncorrelated (1e-6). (The 2x2 design of 'auto' moves 16 of a random model's 4096 input coordinates: its
    effect is checked on the noise below and measured on the pretrained terrain model in BENCHMARKS.md.)"""
    uncorrelated = patched(particle_nodes, tiny_model, mode="EDDY", strength=1e-6, space="pooled NxN",
                           start_coupling="independent")
    base = h.ksample(comfy_nodes, uncorrelated, h.empty_latent(4), seed=seed, steps=STEPS, sampler=sampler)
    model = patched(particle_nodes, tiny_model, mode="EDDY", strength=1.0, space="pooled NxN",
                    start_coupling="independent")
    with caplog.at_level(logging.INFO, logger="shielded_sampling"):
        out = h.ksample(comfy_nodes, model, h.empty_latent(4), seed=seed, steps=STEPS, sampler=sampler)
    assert torch.isfinite(out["samples"]).all()
    assert mean_pairwise(out) > 1.05 * mean_pairwise(base)
    [summary] = eddy_messages(caplog, "EDDY correlated")
    assert "correlated 0 of" not in summary


def test_eddy_noise_sampler_is_given_for_one_run_only(comfy_nodes, particle_nodes, tiny_model):
    eddy_noise_module = h.pack_submodule("nodes.eddy_noise")
    model = patched(particle_nodes, tiny_model, mode="EDDY", strength=1.0, space="pooled NxN")
    seen = []

    key = model.model_options["sampler_post_cfg_function"][-1].key

    def inner(executor, *args, **kwargs):
        run_options = args[2]["model_options"]["transformer_options"]
        seen.append((executor.class_obj, dict(executor.class_obj.extra_options), run_options, run_options.get(key)))
        return executor(*args, **kwargs)
    model.add_wrapper_with_key("sampler_sample", "test_inner", inner)
    h.ksample(comfy_nodes, model, h.empty_latent(3), seed=4, steps=STEPS, sampler="euler_ancestral")
    [(sampler, options, run_options, run)] = seen
    assert isinstance(options["noise_sampler"], eddy_noise_module.EddyNoiseRun) and options["noise_sampler"] is run
    assert "noise_sampler" not in sampler.extra_options
    assert key not in run_options and key not in model.model_options.get("transformer_options", {})


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "uni_pc"])
def test_eddy_with_an_ode_sampler_correlates_the_start_only(comfy_nodes, particle_nodes, tiny_model, sampler,
                                                            caplog):
    import comfy.sample
    correlated = h.pack_submodule("guidance.eddy")
    latent = h.empty_latent(4)
    model = patched(particle_nodes, tiny_model, mode="EDDY", strength=0.7)
    seen = record_noise(model)
    with caplog.at_level(logging.INFO, logger="shielded_sampling"):
        h.ksample(comfy_nodes, model, latent, seed=6, steps=STEPS, sampler=sampler)
    noise = comfy.sample.prepare_noise(latent["samples"], 6)
    torch.testing.assert_close(seen[0], correlated.eddy_noise(noise, 0.7), rtol=0, atol=1e-6)
    assert len(eddy_messages(caplog, "only the starting noise is coupled")) == 1
    assert not eddy_messages(caplog, "EDDY correlated")


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "uni_pc"])
def test_eddy_moves_batches_of_ode_samplers_apart(comfy_nodes, particle_nodes, tiny_model, sampler):
    model = patched(particle_nodes, tiny_model, mode="EDDY", strength=1.0, start_coupling="independent")
    for seed in (0, 1):
        plain = h.ksample(comfy_nodes, tiny_model, h.empty_latent(4), seed=seed, steps=STEPS, sampler=sampler)
        out = h.ksample(comfy_nodes, model, h.empty_latent(4), seed=seed, steps=STEPS, sampler=sampler)
        assert mean_pairwise(out) > 1.05 * mean_pairwise(plain)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_eddy_auto_blends_the_2x2_design_into_the_start(comfy_nodes, particle_nodes, coupling, tiny_model, strength):
    import comfy.sample
    correlated = h.pack_submodule("guidance.eddy")
    eddy_noise_module = h.pack_submodule("nodes.eddy_noise")
    latent = h.empty_latent(4)
    model = patched(particle_nodes, tiny_model, mode="EDDY", strength=strength, start_coupling="auto")
    seen = record_noise(model)
    h.ksample(comfy_nodes, model, latent, seed=8, steps=STEPS, sampler="euler")
    noise = comfy.sample.prepare_noise(latent["samples"], 8)
    independent = eddy_noise_module.seeded_normal(noise, 8, eddy_noise_module.START_SEED_OFFSET)
    expected = correlated.blend(independent, coupling.couple_noise(noise, 2), strength)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)


def test_node_default_start_coupling_is_auto(particle_nodes):
    inputs = particle_nodes.ParticleGuidance.INPUT_TYPES()["required"]
    assert inputs["start_coupling"][1]["default"] == "auto"
    settings = h.pack_submodule("nodes.particle_settings")
    assert [settings.auto_grid(c) for c in (1, 4, 16)] == [4, 2, 1]          # >= 16 coupled numbers per image


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
def test_eddy_auto_draws_every_fresh_noise_from_the_2x2_design(comfy_nodes, particle_nodes, coupling, tiny_model,
                                                               sampler):
    model = patched(particle_nodes, tiny_model, mode="EDDY", strength=1.0, start_coupling="auto")
    draws = []

    def inner(executor, *args, **kwargs):
        run = executor.class_obj.extra_options["noise_sampler"]
        executor.class_obj.extra_options["noise_sampler"] = lambda *a: draws.append(run(*a)) or draws[-1]
        return executor(*args, **kwargs)
    model.add_wrapper_with_key("sampler_sample", "test_inner", inner)
    h.ksample(comfy_nodes, model, h.empty_latent(4, size=64), seed=2, steps=STEPS, sampler=sampler)
    assert len(draws) >= STEPS - 2
    d, _ = coupling.design(4, 16)
    for xi in draws:                                    # coarse coordinates: radii times the rotated simplex
        c = coupling.project(xi.float(), 2)
        r = c.norm(dim=1)
        torch.testing.assert_close(c @ c.t(), r[:, None] * r[None, :] * (d @ d.t()), rtol=0, atol=1e-3)
