"""SPELL in a real Forge-family WebUI: the script's hooks around the host's own k-diffusion sampler path."""
from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

import webui_harness as harness

RTOL = 1e-3


def script_args(**values) -> tuple:
    from shielded_webui.settings import ShieldedSettings
    settings = ShieldedSettings(**values)
    return tuple(getattr(settings, f.name) for f in fields(settings))


@pytest.fixture(scope="session")
def sd_model(webui):
    return harness.tiny_sd_model()


@pytest.fixture
def inject_shields(monkeypatch):
    """Make the shield folder of a generation resolve to the given VAE-latent tensor (no VAE in the tiny model)."""
    from pathlib import Path
    from modules import paths_internal
    from guidance.shields import TensorShields
    from shielded_webui import webui_script

    (Path(paths_internal.models_path) / "shields" / "injected").mkdir(parents=True, exist_ok=True)

    def use(latents: torch.Tensor):
        monkeypatch.setattr(webui_script.ShieldedProcessing, "shield_source",
                            lambda self, p, item_shape: (TensorShields(latents.float()), "injected"))
    return use


def generate(script_module, sd_model, sampler="euler", batch=2, **settings):
    g = harness.Generation(script_module, sd_model, script_args(**settings), sampler=sampler, batch=batch)
    return g, g.run()


def pairwise(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1).double()
    d = torch.cdist(flat, flat)
    return d[~torch.eye(len(x), dtype=torch.bool)]


@pytest.mark.parametrize("sampler", list(harness.SAMPLERS))
def test_outputs_end_outside_every_shield(script_module, sd_model, inject_shields, sampler):
    from shielded_webui.settings import raw_radius
    _, reference = generate(script_module, sd_model, sampler)
    # Shields at the unshielded outputs themselves (stored as VAE latents): every output starts inside one.
    process_out = harness.model_space_out(sd_model)
    inject_shields(process_out(reference))
    radius_rms = 0.25
    g, out = generate(script_module, sd_model, sampler, enabled=True, radius_rms=radius_rms, intra_batch=False,
                      shield_folder="injected")
    run = g.p.shielded_sampling_state.runs[-1]
    # The post-CFG function ran on every evaluation of the host's CFG denoiser (plus the t = 0 step).
    assert run.evaluations == g.model_evaluations >= g.steps
    assert len(run.report.steps) == g.model_evaluations + 1
    r = raw_radius(radius_rms, math.prod(out.shape[1:]))
    dist = torch.cdist(out.flatten(1).double(), reference.flatten(1).double())
    assert dist.min().item() >= r * (1 - RTOL), f"{sampler}: an output ends inside a shield: {dist.min():.4g} < {r:.4g}"
    assert run.outputs_inside() == 0 and all(o.repelled for o in run.report.outputs)
    assert any("Shielded sampling: r = 0.25 rms" in c for c in g.p.comments), g.p.comments


def test_batch_of_four_ends_pairwise_apart(script_module, sd_model):
    from shielded_webui.settings import raw_radius
    _, reference = generate(script_module, sd_model, "euler", batch=4)
    elements = math.prod(reference.shape[1:])
    before = pairwise(reference)
    # A radius beyond the closest unshielded pair, so intra-batch repellency has work to do.
    radius_rms = 1.5 * before.min().item() / math.sqrt(elements)
    r = raw_radius(radius_rms, elements)
    assert before.min().item() < r
    g, out = generate(script_module, sd_model, "euler", batch=4, enabled=True, radius_rms=radius_rms,
                      intra_batch=True)
    after = pairwise(out)
    assert after.min().item() >= r * (1 - RTOL), f"closest pair {after.min():.4g} < r = {r:.4g}"
    assert g.p.extra_generation_params["SPELL intra-batch"] is True
    closest = after.min().item() / math.sqrt(elements)
    assert g.p.extra_generation_params["SPELL result"] == f"4/4 corrected, no shield, closest pair {closest:.4g} rms, " \
                                                          f"0 inside, 0 shields + 0 history"


def test_history_repels_the_next_generation_and_clears(script_module, sd_model):
    from guidance import history
    from shielded_webui.settings import raw_radius
    history.clear("")
    radius_rms = 0.25
    settings = dict(enabled=True, radius_rms=radius_rms, intra_batch=False, history=True, history_name="t")
    _, first = generate(script_module, sd_model, **settings)
    assert history.size("t") == 2
    g, second = generate(script_module, sd_model, **settings)   # same seed: unshielded it would repeat `first`
    r = raw_radius(radius_rms, math.prod(first.shape[1:]))
    dist = torch.cdist(second.flatten(1).double(), first.flatten(1).double())
    assert dist.min().item() >= r * (1 - RTOL)
    assert g.p.shielded_sampling_state.runs[-1].history_count == 2 and history.size("t") == 4
    assert history.clear("t") == 4 and history.size("t") == 0


def test_start_coupling_replaces_the_starting_noise(script_module, sd_model):
    from guidance.coupling import project
    g = harness.Generation(script_module, sd_model, script_args(start_coupling="2x2"), batch=2)
    noise = g.noise()
    g.p.rng = None                            # the script must only transform the noise it is given
    g.script.process(g.p, *g.args)
    g.script.process_before_every_sampling(g.p, *g.args, x=noise, noise=noise, c=g.c, uc=g.uc)
    coupled = g.p.modified_noise
    assert coupled is not None and coupled.shape == noise.shape
    c = project(coupled.double(), 2)
    # Two images: the regular simplex puts their pooled coordinates exactly opposite.
    cos = torch.nn.functional.cosine_similarity(c[0:1], c[1:2]).item()
    assert cos == pytest.approx(-1.0, abs=1e-6)
    assert any("start noise coupled on a 2x2 grid" in c for c in g.p.comments)


def test_shield_folder_encoded_by_the_checkpoint_vae(script_module, sd_model, monkeypatch):
    """End to end through shield_db: PNGs under models/shields/ encoded by the host's own VAE class (Forge's tiny
    model carries a real one), cached, held in RAM, and every output kept outside them; a memory budget that is
    not a number stops the script with its name and the fix."""
    if getattr(sd_model.forge_objects, "vae", None) is None:
        pytest.skip("this host's tiny model has no VAE (reForge's UNet-only stand-in); Forge runs this test")
    import numpy as np
    from pathlib import Path
    from PIL import Image
    from modules import paths_internal
    from shielded_webui.settings import raw_radius
    folder = Path(paths_internal.models_path) / "shields" / "pngs"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"protected_{i}.png")
    _, reference = generate(script_module, sd_model)
    g, _ = generate(script_module, sd_model, enabled=True, radius_rms=0.01, intra_batch=False, shield_folder="pngs")
    source, _ = g.p.shielded_sampling_state.sources[(4, 8, 8)]
    assert len(source) == 3 and (folder / ".shield_db").is_dir()
    process_in = sd_model.forge_objects.vae.first_stage_model.process_in
    shields = process_in(source.latents(list(range(len(source)))).float())
    elements = math.prod(reference.shape[1:])
    # A radius that puts every unshielded output inside some shield, so the folder has to act.
    far = torch.cdist(reference.flatten(1).double(), shields.flatten(1).double()).min(1).values.max().item()
    radius_rms = 1.5 * far / math.sqrt(elements)
    g, out = generate(script_module, sd_model, enabled=True, radius_rms=radius_rms, intra_batch=False,
                      shield_folder="pngs")
    r = raw_radius(radius_rms, elements)
    dist = torch.cdist(out.flatten(1).double(), shields.flatten(1).double())
    assert dist.min().item() >= r * (1 - RTOL)
    assert g.p.shielded_sampling_state.runs[-1].shield_count == 3
    assert source.snapshot.wait_held(timeout=60)
    assert all(hasattr(shard.latent_reader, "array") for shard in source.snapshot.shards)  # held in RAM
    from shielded_webui import shield_folder
    from shielded_webui.settings import SettingsError
    monkeypatch.setenv("SHIELDED_SAMPLING_RESIDENT_MB", "lots")
    with pytest.raises(SettingsError, match="SHIELDED_SAMPLING_RESIDENT_MB='lots'.*unset it"):
        shield_folder.load(folder, sd_model.forge_objects.vae, 64, 64)


def test_hires_second_pass_gets_its_own_run_at_its_own_size(script_module, sd_model):
    from shielded_webui.settings import raw_radius
    g = harness.Generation(script_module, sd_model, script_args(), batch=2)
    reference = g.run_second_pass(g.run())
    radius_rms = 1.5 * pairwise(reference).min().item() / math.sqrt(math.prod(reference.shape[1:]))
    g = harness.Generation(script_module, sd_model, script_args(enabled=True, radius_rms=radius_rms), batch=2)
    first = g.run()
    out = g.run_second_pass(first)
    runs = g.p.shielded_sampling_state.runs
    assert [r.item_shape for r in runs] == [(4, 8, 8), (4, 16, 16)] and all(r.finished for r in runs)
    r = raw_radius(radius_rms, math.prod(out.shape[1:]))
    assert pairwise(out).min().item() >= r * (1 - RTOL)


def test_activity_chart_added_as_an_extra_image(script_module, sd_model):
    import types
    g, _ = generate(script_module, sd_model, enabled=True, radius_rms=0.25, activity_chart=True)
    processed = types.SimpleNamespace(images=[], infotexts=[])
    g.script.postprocess(g.p, processed, *g.args)
    assert len(processed.images) == 1 and processed.images[0].size == (768, 400)
    assert processed.infotexts[0].startswith("Shielded sampling activity chart: SPELL: r=0.25 rms")
    g, _ = generate(script_module, sd_model, enabled=True, radius_rms=0.25)
    processed = types.SimpleNamespace(images=[], infotexts=[])
    g.script.postprocess(g.p, processed, *g.args)
    assert processed.images == []


def test_final_step_keeps_every_output_outside_overlapping_history(script_module, sd_model):
    """Six generations of the same seeds with history and intra-batch, exact rounds off (the settings of
    test_spell_comfy's twin): the balls around earlier outputs overlap, where one eq. 5 step can cancel (before
    7eb1ac6 the 5th run ended 3 outputs at ~0.8 r on both hosts); the t = 0 step must still end every output
    outside them and apart from its batch peers, and the report must say 0 inside."""
    from guidance import history
    from shielded_webui.settings import raw_radius
    history.clear("overlap")
    earlier = []
    for n, radius_rms in enumerate((0.15, 0.15, 0.2, 0.3, 0.15, 0.15)):
        g = harness.Generation(script_module, sd_model, script_args(
            enabled=True, radius_rms=radius_rms, intra_batch=True, history=True, history_name="overlap",
            exact=False), batch=3, seed=42, cfg=7.0)
        out = g.run()
        run = g.p.shielded_sampling_state.runs[-1]
        r = raw_radius(radius_rms, math.prod(out.shape[1:]))
        assert run.history_count == sum(len(e) for e in earlier)
        if earlier:   # model space: the sampler's latents, where SPELL measures
            d = torch.cdist(out.flatten(1).double(), torch.cat(earlier).flatten(1).double())
            assert d.min().item() >= r * (1 - RTOL), (n, radius_rms, d.min().item() / r)
        # The batch's own seeds end far apart here; the history check above is the one that binds.
        assert pairwise(out).min().item() >= r * (1 - RTOL), (n, radius_rms, pairwise(out).min().item() / r)
        assert run.outputs_inside() == 0, run.summary()
        assert " 0 inside," in g.p.extra_generation_params["SPELL result"], g.p.extra_generation_params
        earlier.append(out)
    assert history.clear("overlap") == 18
