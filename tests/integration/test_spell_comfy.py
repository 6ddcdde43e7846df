"""SPELL inside the real ComfyUI sampler (tiny random SD1.5-config model, CPU)."""
import math

import pytest
import torch

import shield_harness as h

SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "ddim"]
STEPS = 8
RADIUS = 0.4   # RMS units


def spell_kwargs(**over):
    kw = dict(radius=RADIUS, overcompensation=1.0, intra_batch=False, history=False, history_name="test",
              history_size=64, start_percent=0.0, end_percent=1.0, exact=False)
    kw.update(over)
    return kw


@pytest.fixture(scope="module")
def history(pack):
    return h.pack_submodule("guidance.history")


def model_space_distances(model, out, shields):
    """Pairwise L2 distances between outputs and shields in the model's space (process_in)."""
    fmt = model.model.latent_format
    a = fmt.process_in(out.clone()).flatten(1).double()
    b = fmt.process_in(shields.clone()).flatten(1).double()
    return torch.cdist(a, b)


def counting(model):
    """Clone of ``model`` whose UNet calls are counted (a model-function wrapper, not part of SPELL)."""
    calls = []
    m = model.clone()

    def wrapper(apply_model, args):
        calls.append(float(args["timestep"].flatten()[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])
    m.set_model_unet_function_wrapper(wrapper)
    return m, calls


def run_node(cls, *args):
    """First output of a host node, classic (FUNCTION) or V3 (execute) style."""
    if hasattr(cls, "FUNCTION"):
        out = getattr(cls(), cls.FUNCTION)(*args)
    else:
        out = cls.execute(*args)
    return (out.result if hasattr(out, "result") else out)[0]


def spell_sample(spell_nodes, model, latent, sampler, seed=7, cfg=5.0, **kw):
    return spell_nodes.SpellSampler().sample(model, seed, STEPS, cfg, sampler, "normal", h.conditioning(1),
                                             h.conditioning(2), latent, 1.0, **spell_kwargs(**kw))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_protects_every_output_from_an_unshielded_run(comfy_nodes, spell_nodes, tiny_model, sampler):
    latent = h.empty_latent(3)
    plain = h.ksample(comfy_nodes, tiny_model, latent, seed=7, steps=STEPS, sampler=sampler)["samples"]
    again = h.ksample(comfy_nodes, tiny_model, latent, seed=7, steps=STEPS, sampler=sampler)["samples"]
    shields = spell_nodes.LatentsToShieldSet().build({"samples": plain}, "run0")[0]

    counted, calls = counting(tiny_model)
    res = spell_sample(spell_nodes, counted, latent, sampler, shield_set=shields)
    out, report = res["result"]
    d_plain = model_space_distances(tiny_model, again, plain).diagonal()
    d = model_space_distances(tiny_model, out["samples"], plain)
    assert torch.allclose(d_plain, torch.zeros_like(d_plain))          # unshielded: sits on the shields
    assert (d >= report.radius * (1 - 1e-3)).all(), f"{sampler}: min distance {d.min()} < r {report.radius}"
    # the hook fired on every model evaluation (+ the t = 0 step on the final latents)
    model_evals = [s for s in report.steps if s.sigma > 0]
    assert len(model_evals) == len(calls) and len(calls) >= STEPS
    assert report.steps[-1].sigma == 0.0
    assert any(s.corrected for s in report.steps)
    assert all(o.distance >= report.radius * (1 - 1e-3) for o in report.outputs)


def test_apply_spell_route_equals_spell_sampler_route(comfy_nodes, spell_nodes, tiny_model):
    latent = h.empty_latent(3)
    plain = h.ksample(comfy_nodes, tiny_model, latent, seed=3, steps=STEPS)["samples"]
    shields = spell_nodes.LatentsToShieldSet().build({"samples": plain}, "run0")[0]
    kw = spell_kwargs(intra_batch=True, overcompensation=1.6, shield_set=shields)
    patched = spell_nodes.ApplySpell().apply(tiny_model, **kw)[0]
    via_patch = h.ksample(comfy_nodes, patched, latent, seed=3, steps=STEPS)["samples"]
    via_sampler = spell_sample(spell_nodes, tiny_model, latent, "euler", seed=3, intra_batch=True,
                               overcompensation=1.6, shield_set=shields)["result"][0]["samples"]
    assert torch.equal(via_patch, via_sampler)
    assert not torch.equal(via_patch, plain)


def test_history_makes_the_second_run_repel_from_the_first(spell_nodes, history, tiny_model):
    history.clear("hist-test")
    latent = h.empty_latent(2)
    first, rep1 = spell_sample(spell_nodes, tiny_model, latent, "euler", seed=11, history=True,
                               history_name="hist-test")["result"]
    assert history.size("hist-test") == 2 and rep1.history_count == 0
    second, rep2 = spell_sample(spell_nodes, tiny_model, latent, "euler", seed=11, history=True,
                                history_name="hist-test")["result"]
    assert rep2.history_count == 2 and history.size("hist-test") == 4
    d = model_space_distances(tiny_model, second["samples"], first["samples"])
    assert (d >= rep2.radius * (1 - 1e-3)).all()
    assert spell_nodes.ClearSpellHistory().clear("hist-test")["ui"]["text"] == ["dropped 4"]
    assert history.size("hist-test") == 0


def test_final_step_keeps_every_output_outside_overlapping_history(spell_nodes, history, tiny_model):
    """Six runs of the same seed with history and intra-batch (the example workflow's settings, exact off): the
    balls around earlier outputs overlap, where one eq. 5 step can cancel; the t = 0 step must still end outside."""
    history.clear("overlap")
    latent = h.empty_latent(3, size=64)
    earlier = []
    for radius in (0.15, 0.15, 0.2, 0.3, 0.15, 0.15):
        out, rep = spell_sample(spell_nodes, tiny_model, latent, "euler", seed=42, cfg=7.0, radius=radius,
                                intra_batch=True, history=True, history_name="overlap", history_size=256)["result"]
        out = out["samples"]
        if earlier:
            d = model_space_distances(tiny_model, out, torch.cat(earlier))
            assert (d >= rep.radius * (1 - 1e-3)).all(), (radius, d.min().item(), rep.radius)
        assert rep.outputs_inside() == 0, rep.summary()
        earlier.append(out)
    history.clear("overlap")


def test_history_cap_keeps_the_newest(history):
    history.clear("cap")
    for i in range(5):
        history.add("cap", torch.full((2, 4, 4, 4), float(i)), cap=6)
    src = history.source("cap", (4, 4, 4))
    assert len(src) == 6 and src.shields[0, 0, 0, 0] == 2.0
    history.clear("cap")


def test_history_through_the_apply_spell_route(comfy_nodes, spell_nodes, history, tiny_model):
    history.clear("route")
    patched = spell_nodes.ApplySpell().apply(tiny_model, **spell_kwargs(history=True, history_name="route"))[0]
    latent = h.empty_latent(2)
    first = h.ksample(comfy_nodes, patched, latent, seed=5, steps=STEPS)["samples"]
    second = h.ksample(comfy_nodes, patched, latent, seed=5, steps=STEPS)["samples"]
    r = RADIUS * math.sqrt(4 * 4 * 4)
    assert history.size("route") == 4
    assert (model_space_distances(tiny_model, second, first) >= r * (1 - 1e-3)).all()
    history.clear("route")


def test_intra_batch_spreads_a_batch_and_per_run_state_is_fresh(spell_nodes, tiny_model):
    latent = h.empty_latent(4)
    res1 = spell_sample(spell_nodes, tiny_model, latent, "euler", seed=1, intra_batch=True, radius=2.0)["result"]
    res2 = spell_sample(spell_nodes, tiny_model, latent, "euler", seed=1, intra_batch=True, radius=2.0)["result"]
    out, report = res1
    d = model_space_distances(tiny_model, out["samples"], out["samples"]) + torch.eye(4) * 1e9
    assert (d >= report.radius * (1 - 1e-3)).all()
    assert torch.equal(out["samples"], res2[0]["samples"])           # nothing leaked from run 1 into run 2
    assert len(res2[1].steps) == len(report.steps)


def test_cfg_one_works(spell_nodes, tiny_model):
    latent = h.empty_latent(2)
    out, report = spell_sample(spell_nodes, tiny_model, latent, "euler", cfg=1.0, intra_batch=True,
                               radius=2.0)["result"]
    d = model_space_distances(tiny_model, out["samples"], out["samples"]) + torch.eye(2) * 1e9
    assert torch.isfinite(out["samples"]).all() and (d >= report.radius * (1 - 1e-3)).all()


def test_ksampler_advanced_and_sampler_custom_advanced(comfy_nodes, spell_nodes, tiny_model):
    import comfy_extras.nodes_custom_sampler as custom
    latent = h.empty_latent(3)
    patched = spell_nodes.ApplySpell().apply(tiny_model, **spell_kwargs(intra_batch=True, radius=2.0))[0]
    r = 2.0 * math.sqrt(4 * 4 * 4)
    adv = comfy_nodes.KSamplerAdvanced().sample(patched, "enable", 9, STEPS, 5.0, "euler", "normal",
                                                h.conditioning(1), h.conditioning(2), latent, 0, STEPS,
                                                "disable")[0]["samples"]
    guider = run_node(custom.CFGGuider, patched, h.conditioning(1), h.conditioning(2), 5.0)
    sampler = run_node(custom.KSamplerSelect, "dpmpp_2m")
    sigmas = run_node(custom.BasicScheduler, patched, "normal", STEPS, 1.0)
    noise = run_node(custom.RandomNoise, 9)
    cust = run_node(custom.SamplerCustomAdvanced, noise, guider, sampler, sigmas, latent)["samples"]
    for out in (adv, cust):
        d = model_space_distances(tiny_model, out, out) + torch.eye(3) * 1e9
        assert (d >= r * (1 - 1e-3)).all()


def test_window_restricts_the_active_steps(spell_nodes, tiny_model):
    latent = h.empty_latent(3)
    _, report = spell_sample(spell_nodes, tiny_model, latent, "euler", intra_batch=True, radius=3.0,
                             start_percent=0.0, end_percent=0.3)["result"]
    sigma_end = tiny_model.model.model_sampling.percent_to_sigma(0.3)
    assert report.steps and all(s.sigma >= sigma_end for s in report.steps)
    assert not any(s.sigma == 0.0 for s in report.steps)                 # no t = 0 step outside the window


def test_bad_inputs_give_clear_errors(spell_nodes, tiny_model):
    latent = h.empty_latent(2)
    with pytest.raises(ValueError, match=r"SPELL Sampler: input 'radius' must be > 0"):
        spell_sample(spell_nodes, tiny_model, latent, "euler", radius=0.0)
    with pytest.raises(ValueError, match=r"Apply SPELL: input 'radius' must be > 0"):
        spell_nodes.ApplySpell().apply(tiny_model, **spell_kwargs(radius=-1.0))
    # Another width/height is resized for comparison (hires passes: test_spell_workflows_comfy.py).
    channels = spell_nodes.LatentsToShieldSet().build({"samples": torch.zeros(2, 16, 4, 4)}, "sd3")[0]
    with pytest.raises(ValueError, match=r"shape 16x4x4 .* 4x4x4: shields have 16 latent channels"):
        spell_sample(spell_nodes, tiny_model, latent, "euler", shield_set=channels)
    bad = torch.zeros(3, 4, 4, 4)
    bad[2, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"Latents to Shield Set: input 'latents' .*NaN or Inf at indices \[2\]"):
        spell_nodes.LatentsToShieldSet().build({"samples": bad}, "nan")
    with pytest.raises(ValueError, match=r"Latents to Shield Set: input 'latents' is empty"):
        spell_nodes.LatentsToShieldSet().build({"samples": torch.zeros(0, 4, 4, 4)}, "empty")


def test_intra_batch_with_batch_one_is_a_documented_no_op(comfy_nodes, spell_nodes, tiny_model, caplog):
    latent = h.empty_latent(1)
    plain = h.ksample(comfy_nodes, tiny_model, latent, seed=2, steps=STEPS)["samples"]
    with caplog.at_level("INFO", logger="shielded_sampling"):
        out, report = spell_sample(spell_nodes, tiny_model, latent, "euler", seed=2, intra_batch=True)["result"]
    assert torch.equal(out["samples"], plain)
    assert "batch size 1" in caplog.text
    assert not any(s.corrected for s in report.steps)


def test_history_nodes_re_execute_when_the_history_changes(spell_nodes, history):
    history.clear("fp")
    kw = dict(history=True, history_name="fp")
    before = spell_nodes.SpellSampler.IS_CHANGED(**kw)
    history.add("fp", torch.zeros(1, 4, 4, 4))
    assert spell_nodes.SpellSampler.IS_CHANGED(**kw) != before
    assert spell_nodes.ApplySpell.IS_CHANGED(history=False, history_name="fp") == ""
    history.clear("fp")


def test_a_downstream_clone_shares_the_patch_and_its_report(comfy_nodes, spell_nodes, tiny_model):
    """ModelPatcher.clone() deep-copies model_options: the SPELL patch (and its shields) must not be copied."""
    from comfyui_shielded_sampling.nodes.spell_hook import SpellPatch
    shields = spell_nodes.LatentsToShieldSet().build({"samples": torch.randn(4, 4, 4, 4)}, "s")[0]
    patched = spell_nodes.ApplySpell().apply(tiny_model, **spell_kwargs(shield_set=shields))[0]
    downstream = patched.clone()
    mine = [f.__self__ for f in patched.get_all_wrappers("predict_noise") if isinstance(getattr(f, "__self__", None), SpellPatch)]
    theirs = [f.__self__ for f in downstream.get_all_wrappers("predict_noise") if isinstance(getattr(f, "__self__", None), SpellPatch)]
    assert mine and theirs and mine[0] is theirs[0]
    h.ksample(comfy_nodes, downstream, h.empty_latent(2), steps=STEPS)
    assert mine[0].last_report is not None and len(mine[0].last_report.steps) >= STEPS
