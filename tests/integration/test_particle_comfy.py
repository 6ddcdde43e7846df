"""Particle Guidance node inside the real ComfyUI sampler (tiny random SD1.5-config model, CPU)."""
import logging

import pytest
import torch

import shield_harness as h

SAMPLERS = ["euler", "dpmpp_2m", "euler_ancestral", "uni_pc"]
STEPS = 8


@pytest.fixture(scope="module")
def particle_nodes(pack):
    return h.pack_submodule("nodes.particle_nodes")


def patched(particle_nodes, model, mode="particle guidance", strength=1.0, space="latent", pool_size=2,
            bandwidth=0.0, start_percent=0.0, end_percent=1.0):
    node = particle_nodes.ParticleGuidance()
    return node.apply(model, mode, strength, space, pool_size, bandwidth, start_percent, end_percent)[0]


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
def test_eddy_runs_and_changes_the_batch(comfy_nodes, particle_nodes, tiny_model, sampler):
    plain = h.ksample(comfy_nodes, tiny_model, h.empty_latent(4), seed=3, steps=STEPS, sampler=sampler)
    model = patched(particle_nodes, tiny_model, mode="EDDY", strength=1.0, space="pooled NxN")
    guided = h.ksample(comfy_nodes, model, h.empty_latent(4), seed=3, steps=STEPS, sampler=sampler)
    assert torch.isfinite(guided["samples"]).all()
    assert not torch.allclose(guided["samples"], plain["samples"])


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode", ["particle guidance", "EDDY"])
def test_batch_of_one_is_unchanged_and_logged_once(comfy_nodes, particle_nodes, tiny_model, sampler, mode,
                                                   caplog):
    plain = h.ksample(comfy_nodes, tiny_model, h.empty_latent(1), seed=5, steps=STEPS, sampler=sampler)
    model = patched(particle_nodes, tiny_model, mode=mode, strength=2.0)
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
    with pytest.raises(ValueError, match="Particle Guidance: input 'start_percent/end_percent'"):
        patched(particle_nodes, tiny_model, start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="Particle Guidance: input 'space'"):
        patched(particle_nodes, tiny_model, space="dino")


def test_patch_survives_model_clone(particle_nodes, tiny_model):
    import copy
    model = patched(particle_nodes, tiny_model)
    fns = model.clone().model_options["sampler_post_cfg_function"]
    assert fns[-1] is model.model_options["sampler_post_cfg_function"][-1]
    assert copy.deepcopy(fns[-1]) is fns[-1]
