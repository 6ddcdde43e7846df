"""The per-step hooks of SPELL, DNG and particle guidance / EDDY drift with the sampler's tensors on an accelerator
without float64 (MPS).

A real ComfyUI run on the CPU records each hook call (its run state and inputs, and what the hook returned); the
same calls are then replayed with their tensors on ``tests/fake_accelerator.py``'s stand-in device, which refuses
float64, mixed-device operations and host reads of device memory as MPS does. The answers must be the CPU's.
(The host's own sampler is not run on the stand-in: only the pack's code is under test.)
"""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import shield_harness as h

STEPS = 4


def stand_in():
    spec = importlib.util.spec_from_file_location("fake_accelerator", Path(__file__).resolve().parents[1] /
                                                  "fake_accelerator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recording(monkeypatch, cls, name: str, state_copy=None):
    """Wrap ``cls.name`` to record ``(self, args, kwargs, (state before, state after), result)`` per call."""
    calls, original = [], getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        before = state_copy(args) if state_copy else None
        result = original(self, *args, **kwargs)
        calls.append((self, args, kwargs, (before, state_copy(args) if state_copy else None), result))
        return result
    monkeypatch.setattr(cls, name, wrapper)
    return calls, original


def on_device(fake, value):
    return fake.to_device(value.float()) if isinstance(value, torch.Tensor) and value.dim() > 0 else value


@pytest.mark.parametrize("case", ["shields", "shields + intra-batch", "inpainting"])
def test_spell_correction_and_report_on_the_accelerator(monkeypatch, comfy_nodes, pack, tiny_model, case):
    fake = stand_in()
    spell_nodes, hook = h.pack_submodule("nodes.spell_nodes"), h.pack_submodule("nodes.spell_hook")
    intra_batch = case == "shields + intra-batch"
    radius = 12.0 if case == "inpainting" else 0.4    # RMS; the random model's inpainted halves land ~9 RMS away
    latent = h.empty_latent(3)
    plain = h.ksample(comfy_nodes, tiny_model, latent, seed=5, steps=STEPS)["samples"]
    shields = spell_nodes.LatentsToShieldSet().build({"samples": plain}, "accel")[0]
    if case == "inpainting":              # sample again from the shields' own latents, the right half masked
        mask = torch.zeros(3, *plain.shape[-2:])
        mask[..., plain.shape[-1] // 2:] = 1.0
        latent = {"samples": plain.clone(), "noise_mask": mask}
    calls, correct = recording(monkeypatch, hook.SpellPatch, "correct")
    spell_nodes.SpellSampler().sample(tiny_model, 5, STEPS, 5.0, "euler", "normal", h.conditioning(1),
                                      h.conditioning(2), latent, 1.0, radius=radius, overcompensation=1.0,
                                      intra_batch=intra_batch, history=False, history_name="accel",
                                      history_size=16, start_percent=0.0, end_percent=1.0, exact=False,
                                      shield_set=shields)
    assert calls and any(not torch.equal(args[1], result) for _, args, _, _, result in calls)   # SPELL moved some
    assert any(kwargs.get("final") for _, _, kwargs, _, _ in calls)                            # the t = 0 step too
    assert (case == "inpainting") == all(run.mask is not None for _, (run, *_), _, _, _ in calls)
    for patch, (run, x0_hat, x_t, sigma), kwargs, _, result in calls:
        for name in ("mask", "last_mask", "kept"):     # attach_inputs puts them on the noise's device
            if getattr(run, name) is not None and not isinstance(getattr(run, name), fake.OnAccelerator):
                setattr(run, name, fake.to_device(getattr(run, name)))
        with fake.fake_accelerator():
            again = correct(patch, run, on_device(fake, x0_hat), on_device(fake, x_t), sigma, **kwargs)
            patch.record_outputs(run, on_device(fake, again))
        assert isinstance(again, fake.OnAccelerator) and torch.equal(again.cpu(), result.float())


def test_dng_guidance_on_the_accelerator(monkeypatch, comfy_nodes, pack, tiny_model):
    fake = stand_in()
    dng_nodes, hook = h.pack_submodule("nodes.dng_nodes"), h.pack_submodule("nodes.dng_hook")
    calls, guide = recording(monkeypatch, hook.DngSession, "guide", state_copy=lambda args: copy.deepcopy(args[0].tracker))
    model = dng_nodes.DynamicNegativeGuidance().apply(tiny_model, concept=h.conditioning(3), scale=4.0, prior=0.3,
                                                      temperature=0.2, offset=0.002, p_max=0.9, p_min=1e-6,
                                                      start_percent=0.0, end_percent=1.0, mode="dynamic")[0]
    h.ksample(comfy_nodes, model, h.empty_latent(2), seed=11, steps=STEPS)
    assert len(calls) >= STEPS and any(not torch.equal(args[-1], result) for _, args, _, _, result in calls)
    for session, (run, x, sigma, d_base, d_concept, denoised), _, (before, after), result in calls:
        replay = copy.copy(run)
        replay.tracker = copy.deepcopy(before)           # the posterior as it was before this call
        with fake.fake_accelerator():
            again = guide(session, replay, *(on_device(fake, t) for t in (x, sigma, d_base, d_concept, denoised)))
        assert isinstance(again, fake.OnAccelerator) and torch.equal(again.cpu(), result.float())
        assert torch.equal(replay.tracker.log_p, after.log_p)


@pytest.mark.parametrize("mode", ["particle guidance", "EDDY drift (paper form)"])
@pytest.mark.parametrize("space", ["latent", "pooled NxN", "colour", "edges"])
def test_particle_and_eddy_drift_corrections_on_the_accelerator(monkeypatch, comfy_nodes, pack, tiny_model, mode,
                                                                  space):
    fake = stand_in()
    particle_nodes, patch_mod = h.pack_submodule("nodes.particle_nodes"), h.pack_submodule("nodes.particle_patch")
    calls, correction = recording(monkeypatch, patch_mod.PredictionPatch, "correction")
    model = particle_nodes.ParticleGuidance().apply(tiny_model, mode, 1.0, space, 2, 0.0, 0.0, 1.0,
                                                    "independent")[0]
    h.ksample(comfy_nodes, model, h.empty_latent(3), seed=3, steps=STEPS)
    assert len(calls) >= STEPS
    for patch, (denoised, x, sigma), _, _, result in calls:
        with fake.fake_accelerator():
            again = correction(patch, on_device(fake, denoised), on_device(fake, x), sigma)
        assert isinstance(again, fake.OnAccelerator) and torch.equal(again.cpu(), result)
