"""Per-run state of SPELL, DNG and particle/EDDY (``nodes/run_state.py``) inside the real ComfyUI sampler: a run
that raises mid-way leaves no state behind, and the next run of the same patched model is the run of a fresh one."""
import pytest
import torch

import shield_harness as h

STEPS = 6
FAIL_AT = 3     # the post-CFG call (model evaluation) that raises


class Interrupted(RuntimeError):
    pass


@pytest.fixture(scope="module")
def run_state(pack):
    return h.pack_submodule("nodes.run_state")


def patch_of(model, wrapper_type: str, kind: str):
    """(key, patch object) of the pack's wrapper of ``kind`` on ``model``."""
    [key] = [k for k in model.wrappers[wrapper_type] if k.startswith(f"shielded_{kind}_")]
    return key, model.wrappers[wrapper_type][key][0].__self__


def failing(model, run_state, key, level):
    """A clone that raises at post-CFG call FAIL_AT. It records the run's options at the patch's wrapper level (a
    wrapper inside the patch's), where the state lives, and the state every post-CFG call finds."""
    stored, seen = [], []

    def record(executor, *args, **kwargs):
        stored.append(args[2]["model_options"] if level == "sampler_sample" else executor.class_obj.model_options)
        return executor(*args, **kwargs)

    def interrupt(args):
        seen.append(run_state.find_run_state(args["model_options"], key))
        if len(seen) == FAIL_AT:
            raise Interrupted("interrupted mid-run")
        return args["denoised"]
    m = model.clone()
    m.add_wrapper_with_key(level, "test_run_state", record)
    m.set_model_sampler_post_cfg_function(interrupt)
    return m, stored, seen


def assert_dropped(run_state, key, stored, seen):
    """One state for the whole run, found by every step, and gone from the run's options after the raise."""
    assert len(stored) == 1 and len(seen) == FAIL_AT
    assert seen[0] is not None and all(state is seen[0] for state in seen)
    assert run_state.find_run_state(stored[0], key) is None


def test_keep_run_state_drops_on_raise_and_restores_an_outer_run(run_state):
    options = {}
    with pytest.raises(Interrupted), run_state.keep_run_state(options, "k", "run 1"):
        assert run_state.find_run_state(options, "k") == "run 1"
        raise Interrupted
    assert run_state.find_run_state(options, "k") is None and options["transformer_options"] == {}
    with run_state.keep_run_state(options, "k", "outer"):
        with run_state.keep_run_state(options, "k", "inner"):
            assert run_state.find_run_state(options, "k") == "inner"
        assert run_state.find_run_state(options, "k") == "outer"
    assert run_state.find_run_state({}, "k") is None


def test_spell_run_that_raises_leaves_no_state_and_no_history(comfy_nodes, pack, run_state, tiny_model):
    spell_nodes = h.pack_submodule("nodes.spell_nodes")
    history = h.pack_submodule("guidance.history")
    kw = {"radius": 2.0, "overcompensation": 1.0, "intra_batch": True, "history": True, "history_name": "runstate",
          "history_size": 64, "start_percent": 0.0, "end_percent": 1.0, "exact": False}
    history.clear("runstate")
    model = spell_nodes.ApplySpell().apply(tiny_model, **kw)[0]
    key, patch = patch_of(model, "sampler_sample", "spell")
    broken, stored, seen = failing(model, run_state, key, "sampler_sample")
    with pytest.raises(Interrupted):
        h.ksample(comfy_nodes, broken, h.empty_latent(3), seed=2, steps=STEPS)
    assert_dropped(run_state, key, stored, seen)
    assert history.size("runstate") == 0                     # a failed run adds no outputs to the history
    second = h.ksample(comfy_nodes, model, h.empty_latent(3), seed=2, steps=STEPS)["samples"]
    report = patch.last_report
    history.clear("runstate")
    fresh_model = spell_nodes.ApplySpell().apply(tiny_model, **kw)[0]
    fresh = h.ksample(comfy_nodes, fresh_model, h.empty_latent(3), seed=2, steps=STEPS)["samples"]
    fresh_report = patch_of(fresh_model, "sampler_sample", "spell")[1].last_report
    history.clear("runstate")
    assert torch.equal(second, fresh)
    assert len(report.steps) == len(fresh_report.steps) and [o.repelled for o in report.outputs] == \
        [o.repelled for o in fresh_report.outputs]


def test_dng_run_that_raises_leaves_no_state_and_the_next_starts_from_the_prior(comfy_nodes, pack, run_state,
                                                                                tiny_model):
    dng_nodes = h.pack_submodule("nodes.dng_nodes")
    kw = {"concept": h.conditioning(3), "scale": 4.0, "prior": 0.2, "temperature": 1.0, "offset": 0.0, "p_max": 0.9,
          "p_min": 1e-6, "start_percent": 0.0, "end_percent": 1.0, "mode": "dynamic"}
    model, trace = dng_nodes.DynamicNegativeGuidance().apply(tiny_model, **kw)
    key, _ = patch_of(model, "outer_sample", "dng")
    broken, stored, seen = failing(model, run_state, key, "outer_sample")
    with pytest.raises(Interrupted):
        h.ksample(comfy_nodes, broken, h.empty_latent(2), seed=5, steps=STEPS, sampler="euler_ancestral")
    assert_dropped(run_state, key, stored, seen)
    second = h.ksample(comfy_nodes, model, h.empty_latent(2), seed=5, steps=STEPS, sampler="euler_ancestral")
    fresh_model, fresh_trace = dng_nodes.DynamicNegativeGuidance().apply(tiny_model, **kw)
    fresh = h.ksample(comfy_nodes, fresh_model, h.empty_latent(2), seed=5, steps=STEPS, sampler="euler_ancestral")
    assert torch.equal(second["samples"], fresh["samples"])
    assert trace.posterior[0] == pytest.approx([0.2, 0.2]) and trace.posterior == fresh_trace.posterior
    assert trace.sigmas == fresh_trace.sigmas


def test_eddy_run_that_raises_leaves_no_state_and_restores_the_sampler(comfy_nodes, pack, run_state, tiny_model):
    import comfy.sample
    import comfy.samplers
    particle_nodes = h.pack_submodule("nodes.particle_nodes")
    eddy_noise = h.pack_submodule("nodes.eddy_noise")
    args = ("EDDY", 1.0, "pooled NxN", 2, 0.0, 0.0, 1.0, "independent")
    model = particle_nodes.ParticleGuidance().apply(tiny_model, *args)[0]
    key, _ = patch_of(model, "sampler_sample", "particle_noise")
    sampler = comfy.samplers.sampler_object("euler_ancestral")     # one SAMPLER object reused, as a graph does
    latent = h.empty_latent(3)["samples"]
    noise = comfy.sample.prepare_noise(latent, 9)
    sigmas = comfy.samplers.KSampler(model, STEPS, "cpu", sampler="euler_ancestral", scheduler="normal").sigmas

    def sample(m):
        return comfy.sample.sample_custom(m, noise, 5.0, sampler, sigmas, h.conditioning(1), h.conditioning(2),
                                          latent, seed=9)
    broken, stored, seen = failing(model, run_state, key, "sampler_sample")
    with pytest.raises(Interrupted):
        sample(broken)
    assert_dropped(run_state, key, stored, seen)
    assert isinstance(seen[0], eddy_noise.EddyNoiseRun) and seen[0].draws == FAIL_AT - 1
    assert "noise_sampler" not in sampler.extra_options
    second = sample(model)
    fresh = sample(particle_nodes.ParticleGuidance().apply(tiny_model, *args)[0])
    assert torch.equal(second, fresh)
