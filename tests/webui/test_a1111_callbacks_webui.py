"""SPELL through Automatic1111's CFG callbacks (``on_cfg_denoiser`` + ``on_cfg_after_cfg``), the path used when the
WebUI has no Forge patcher (A1111 1.10).

No Automatic1111 tree is available to the tests. reForge and Forge carry A1111's ``CFGDenoiser`` and fire both
callbacks from it (after the inpainting blend, as A1111 does), so the path runs here through the host's real
sampler and the host's own callback dispatch; only the script's choice of hook is forced (``has_forge_objects``
reports no patcher). The one A1111-only case, DDIM / PLMS / UniPC handing the callback a noise estimate, is tested
with reForge's copy of A1111's ``CFGDenoiserTimesteps`` set up as in A1111 1.10 (``classic_ddim_eps_estimation``
off, ``mask_before_denoising`` on) and the host's ``CFGDenoiserParams`` / ``AfterCFGCallbackParams`` dispatched by
the host's ``script_callbacks``; Forge has no copy of that class, so it skips that test.
"""
from __future__ import annotations

import math

import pytest
import torch

import webui_harness as harness
from test_img2img_webui import SHAPE, img2img, init_latent, min_distance
from test_spell_webui import RTOL, generate, inject_shields, script_args  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def sd_model(webui):
    return harness.tiny_sd_model()


@pytest.fixture
def a1111(monkeypatch, sd_model):
    """The script sees a WebUI without Forge patcher; the checkpoint carries A1111's ``scale_factor``."""
    from shielded_webui import forge_hook
    scale, shift = forge_hook.latent_affine(forge_hook.process_in(sd_model), SHAPE)
    assert shift == 0.0
    monkeypatch.setattr(forge_hook, "has_forge_objects", lambda model: False)
    monkeypatch.setattr(sd_model, "scale_factor", scale, raising=False)
    return scale


def our_post_cfg_functions(g) -> list:
    options = g.p.sd_model.forge_objects.unet.model_options
    return [f for f in options.get("sampler_post_cfg_function", []) if "shielded" in getattr(f, "__module__", "")]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde", "ddim"])
def test_callbacks_keep_outputs_outside_every_shield(script_module, sd_model, inject_shields, a1111, sampler):
    from shielded_webui.settings import raw_radius
    _, reference = generate(script_module, sd_model, sampler)
    inject_shields(harness.model_space_out(sd_model)(reference))
    radius_rms = 0.25
    g, out = generate(script_module, sd_model, sampler, enabled=True, radius_rms=radius_rms, intra_batch=False,
                      shield_folder="injected")
    state = g.p.shielded_sampling_state
    assert state.hook == "A1111 CFG callbacks" and our_post_cfg_functions(g) == []
    run = state.runs[-1]
    assert len(state.runs) == 1 and run.evaluations == g.model_evaluations >= g.steps
    r = raw_radius(radius_rms, math.prod(out.shape[1:]))
    assert min_distance(out, reference) >= r * (1 - RTOL)
    assert run.outputs_inside() == 0 and all(o.repelled for o in run.report.outputs)
    assert any("Shielded sampling: r = 0.25 rms" in c for c in g.p.comments), g.p.comments


def test_callbacks_intra_batch_and_history(script_module, sd_model, a1111):
    from guidance import history
    from shielded_webui.settings import raw_radius
    history.clear("")
    _, reference = generate(script_module, sd_model, "euler", batch=4)
    elements = math.prod(reference.shape[1:])
    flat = reference.flatten(1).double()
    closest = torch.cdist(flat, flat)[~torch.eye(4, dtype=torch.bool)].min().item()
    radius_rms = 1.5 * closest / math.sqrt(elements)
    settings = dict(enabled=True, radius_rms=radius_rms, intra_batch=True, history=True, history_name="cb")
    _, first = generate(script_module, sd_model, "euler", batch=4, **settings)
    r = raw_radius(radius_rms, elements)
    flat = first.flatten(1).double()
    assert torch.cdist(flat, flat)[~torch.eye(4, dtype=torch.bool)].min().item() >= r * (1 - RTOL)
    # History is stored as VAE latents (sampler space / scale_factor) and repels the next generation.
    assert torch.allclose(history.source("cb", SHAPE).shields.float() * a1111, first, atol=1e-5)
    _, second = generate(script_module, sd_model, "euler", batch=4, **settings)
    assert min_distance(second, first) >= r * (1 - RTOL)
    history.clear("cb")


def test_callbacks_inpainting_moves_only_the_masked_part(script_module, sd_model, inject_shields, a1111):
    from shielded_webui.settings import raw_radius
    init = init_latent()
    nmask = harness.half_mask(SHAPE)
    kept = (nmask == 0).expand_as(init)
    _, reference = img2img(script_module, sd_model, init, nmask=nmask)
    inject_shields(harness.model_space_out(sd_model)(reference))
    g, out = img2img(script_module, sd_model, init, nmask=nmask, enabled=True, radius_rms=0.2, intra_batch=False,
                     shield_folder="injected")
    run = g.p.shielded_sampling_state.runs[-1]
    assert g.p.shielded_sampling_state.hook == "A1111 CFG callbacks"
    assert min_distance(out, reference) >= raw_radius(0.2, math.prod(SHAPE)) * (1 - RTOL)
    assert torch.equal(out[kept], init[kept])
    assert run.outputs_inside() == 0 and run.report.movable_fraction == [0.5, 0.5]


def test_a1111_ddim_noise_estimate_is_converted(script_module, sd_model, inject_shields, a1111):
    """A1111's DDIM/PLMS/UniPC give ``on_cfg_after_cfg`` eps at an integer timestep: the script corrects the x0
    estimate the host's own ``get_pred_x0`` makes of it and hands back the eps that yields the corrected x0."""
    from modules import script_callbacks, sd_samplers_timesteps, shared
    from shielded_webui.settings import raw_radius
    denoiser_class = sd_samplers_timesteps.CFGDenoiserTimesteps
    if "get_pred_x0" not in denoiser_class.__dict__:
        pytest.skip("this host's CFGDenoiserTimesteps is Forge's own (no A1111 eps path); reForge carries A1111's")
    shared.sd_model = sd_model
    g = harness.Generation(script_module, sd_model, script_args(enabled=True, radius_rms=0.2, intra_batch=False,
                                                                shield_folder="injected"))
    denoiser = denoiser_class(sampler=None)
    denoiser.classic_ddim_eps_estimation, denoiser.mask_before_denoising = False, True   # as in A1111 1.10
    denoiser.p = g.p
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn((2, *SHAPE), generator=gen)
    eps = torch.randn((2, *SHAPE), generator=gen)
    timestep = torch.full((2,), 501.0)
    x0 = denoiser.get_pred_x0(x_t, eps, timestep)
    inject_shields(harness.model_space_out(sd_model)(x0))       # both x0 estimates sit at a shield's centre
    g.script.process(g.p, *g.args)
    # A1111 passes the cond rows and then the batch itself: x_in = [x (cond), x (uncond)], sigma_in likewise.
    params = script_callbacks.CFGDenoiserParams(torch.cat([x_t, x_t]), None, torch.cat([timestep, timestep]), 0, 6,
                                                None, None, denoiser)
    script_callbacks.cfg_denoiser_callback(params)
    after = script_callbacks.AfterCFGCallbackParams(eps.clone(), 0, 6)
    script_callbacks.cfg_after_cfg_callback(after)
    corrected_x0 = denoiser.get_pred_x0(x_t, after.x, timestep)
    r = raw_radius(0.2, math.prod(SHAPE))
    assert not torch.equal(after.x, eps)
    assert min_distance(corrected_x0, x0) >= r * (1 - RTOL)
    run = g.p.shielded_sampling_state.runs[-1]
    alpha_bar = float(shared.sd_model.alphas_cumprod[501])
    assert run.evaluations == 1 and run.report.sigmas == [pytest.approx(math.sqrt((1 - alpha_bar) / alpha_bar))]


def test_a1111_shield_folder_encoded_by_the_checkpoint_first_stage(script_module, sd_model, a1111, monkeypatch):
    """A1111's checkpoint VAE is Stability-AI's ldm ``AutoencoderKL`` (``sd_model.first_stage_model``): PNGs under
    models/shields/ are encoded to its posterior mode through shield_db, seen in sampler space (x scale_factor)."""
    autoencoder = pytest.importorskip("ldm.models.autoencoder",
                                      reason="Stability-AI's ldm (A1111's first-stage class) is not in this venv; "
                                             "reForge's venv carries it")
    import numpy as np
    from pathlib import Path
    from PIL import Image
    from modules import paths_internal
    from shielded_webui.settings import raw_radius
    torch.manual_seed(0)
    ddconfig = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    vae = autoencoder.AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=4).eval()
    monkeypatch.setattr(sd_model, "first_stage_model", vae, raising=False)
    folder = Path(paths_internal.models_path) / "shields" / "a1111pngs"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    for i in range(3):
        Image.fromarray(pixels[i]).save(folder / f"protected_{i}.png")
    with torch.no_grad():
        expected = vae.encode(torch.from_numpy(pixels).float().movedim(-1, 1) / 127.5 - 1.0).mode() * a1111
    _, reference = generate(script_module, sd_model)
    far = torch.cdist(reference.flatten(1).double(), expected.flatten(1).double()).min(1).values.max().item()
    radius_rms = 1.5 * far / math.sqrt(math.prod(SHAPE))     # every unshielded output lies inside some shield
    g, out = generate(script_module, sd_model, enabled=True, radius_rms=radius_rms, intra_batch=False,
                      shield_folder="a1111pngs")
    state = g.p.shielded_sampling_state
    source, _ = state.sources[SHAPE]
    stored = source.latents(list(range(len(source)))).float() * a1111
    assert state.hook == "A1111 CFG callbacks" and (folder / ".shield_db").is_dir()
    assert torch.allclose(stored, expected, atol=1e-4)
    assert min_distance(out, expected) >= raw_radius(radius_rms, math.prod(SHAPE)) * (1 - RTOL)
    assert state.runs[-1].shield_count == 3 and state.runs[-1].outputs_inside() == 0


def test_a_failure_inside_the_callbacks_is_never_silent(script_module, sd_model, a1111, monkeypatch):
    """The WebUI only logs what a callback raises: SPELL failing mid-sampling interrupts the generation and says so
    under the image and in its infotext; with 'Continue unshielded' it goes on and says it is unshielded."""
    from modules import shared
    from shielded_webui.spell_run import SpellRun

    def broken(self, *args, **kwargs):
        raise MemoryError("out of memory in the test")

    monkeypatch.setattr(SpellRun, "correct", broken)
    try:
        g, _ = generate(script_module, sd_model, enabled=True, radius_rms=0.2)
        assert shared.state.interrupted
    finally:
        shared.state.interrupted = False
    result = g.p.extra_generation_params["SPELL result"]
    assert result.startswith("STOPPED, NOT SHIELDED: Shielded sampling: SPELL failed during sampling: MemoryError")
    assert any(c.startswith("STOPPED, NOT SHIELDED") for c in g.p.comments), g.p.comments
    assert not any(c.startswith("Shielded sampling: r =") for c in g.p.comments)    # no summary of a run that failed

    _, reference = generate(script_module, sd_model)
    g, out = generate(script_module, sd_model, enabled=True, radius_rms=0.2, allow_unshielded=True)
    assert not shared.state.interrupted
    assert g.p.extra_generation_params["SPELL result"].startswith("UNSHIELDED: Shielded sampling: SPELL failed")
    assert torch.equal(out, reference)          # went on exactly as an unshielded generation
