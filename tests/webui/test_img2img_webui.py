"""SPELL in img2img and inpainting through the host's own ``StableDiffusionProcessingImg2Img.sample``: the CFG
denoiser's per-step mask blend and the final blend are the host's; the script's hooks are called by the host's
own ``ScriptRunner``."""
from __future__ import annotations

import math

import pytest
import torch

import webui_harness as harness
from test_spell_webui import RTOL, inject_shields, script_args  # noqa: F401  (fixture)

SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def sd_model(webui):
    return harness.tiny_sd_model()


def init_latent(batch: int = 2, seed: int = 7) -> torch.Tensor:
    """A fixed sampler-space latent standing in for an encoded init image (unit scale, as SD latents are)."""
    return torch.randn((batch, *SHAPE), generator=torch.Generator().manual_seed(seed))


def img2img(script_module, sd_model, init, nmask=None, sampler="euler", **settings):
    g = harness.Img2ImgGeneration(script_module, sd_model, script_args(**settings), init, nmask=nmask,
                                  sampler=sampler)
    return g, g.run()


def min_distance(out: torch.Tensor, centres: torch.Tensor) -> float:
    return torch.cdist(out.flatten(1).double(), centres.flatten(1).double()).min().item()


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_img2img_ends_outside_every_shield(script_module, sd_model, inject_shields, sampler):
    from shielded_webui.settings import raw_radius
    init = init_latent()
    _, reference = img2img(script_module, sd_model, init, sampler=sampler)
    assert reference.shape == init.shape and not torch.allclose(reference, init)   # denoise 0.6 changed it
    inject_shields(harness.model_space_out(sd_model)(reference))
    radius_rms = 0.25
    g, out = img2img(script_module, sd_model, init, sampler=sampler, enabled=True, radius_rms=radius_rms,
                     intra_batch=False, shield_folder="injected")
    run = g.p.shielded_sampling_state.runs[-1]
    assert run.evaluations == g.model_evaluations > 0     # the post-CFG function ran on every host evaluation
    r = raw_radius(radius_rms, math.prod(SHAPE))
    assert min_distance(out, reference) >= r * (1 - RTOL)
    assert run.outputs_inside() == 0 and run.report.init_inside == 0
    assert any("Shielded sampling: r = 0.25 rms" in c for c in g.p.comments), g.p.comments


def test_img2img_from_a_shielded_image_leave_it_or_exclude_it(script_module, sd_model, inject_shields):
    """The init image is itself a shield: 'leave it' keeps the output out of it, 'exclude it' leaves it out of the
    run (the output is then the unshielded one, as far as no other shield is near)."""
    from shielded_webui.settings import raw_radius
    init = init_latent(batch=1)
    _, reference = img2img(script_module, sd_model, init)
    r_rms = 1.5 * (reference - init).flatten(1).norm(dim=1).item() / math.sqrt(math.prod(SHAPE))
    r = raw_radius(r_rms, math.prod(SHAPE))
    assert (reference - init).norm().item() < r    # unshielded, the edit stays inside the init image's shield
    inject_shields(harness.model_space_out(sd_model)(init))
    settings = dict(enabled=True, radius_rms=r_rms, intra_batch=False, shield_folder="injected")

    g, left = img2img(script_module, sd_model, init, **settings)
    run = g.p.shielded_sampling_state.runs[-1]
    assert run.report.init_inside == 1 and not run.report.init_excluded
    assert min_distance(left, init) >= r * (1 - RTOL) and run.outputs_inside() == 0
    assert any("lies inside 1 shield(s), the output is kept out of them" in c for c in g.p.comments)

    g, excluded = img2img(script_module, sd_model, init, init_image_shield="exclude it", **settings)
    run = g.p.shielded_sampling_state.runs[-1]
    assert run.report.init_excluded and len(run.source) == 0
    assert torch.allclose(excluded, reference, atol=1e-6, rtol=0)
    assert g.p.extra_generation_params["SPELL init image"] == "exclude it"
    assert any("excluded from this run" in c for c in g.p.comments)


def test_inpainting_moves_only_the_masked_part(script_module, sd_model, inject_shields):
    from shielded_webui.settings import raw_radius
    init = init_latent()
    nmask = harness.half_mask(SHAPE)
    kept = (nmask == 0).expand_as(init)
    _, reference = img2img(script_module, sd_model, init, nmask=nmask)
    assert torch.equal(reference[kept], init[kept])     # the host's own blend keeps the unmasked part
    inject_shields(harness.model_space_out(sd_model)(reference))
    radius_rms = 0.2
    g, out = img2img(script_module, sd_model, init, nmask=nmask, enabled=True, radius_rms=radius_rms,
                     intra_batch=False, shield_folder="injected")
    run = g.p.shielded_sampling_state.runs[-1]
    r = raw_radius(radius_rms, math.prod(SHAPE))
    assert min_distance(out, reference) >= r * (1 - RTOL)
    assert torch.equal(out[kept], init[kept]), "SPELL moved the kept (unmasked) part of the image"
    assert not torch.allclose(out[~kept], reference[~kept])
    assert run.outputs_inside() == 0 and run.report.movable_fraction == [0.5, 0.5]
    assert any("inpainting: the mask frees 50% of the latent" in c for c in g.p.comments), g.p.comments


def test_inpainting_with_an_empty_mask_reports_the_output_inside(script_module, sd_model, inject_shields):
    """A mask that frees nothing cannot move the output out of a shield: said under the image, never hidden."""
    init = init_latent(batch=1)
    inject_shields(harness.model_space_out(sd_model)(init))
    g, out = img2img(script_module, sd_model, init, nmask=torch.zeros(SHAPE), enabled=True, radius_rms=0.2,
                     intra_batch=False, shield_folder="injected")
    run = g.p.shielded_sampling_state.runs[-1]
    assert torch.equal(out, init)
    assert run.outputs_inside() == 1 and run.unmovable == 1
    summary = [c for c in g.p.comments if c.startswith("Shielded sampling: r =")]
    assert summary and "1 inside" in summary[0] and "INSIDE a shield cannot move" in summary[0], g.p.comments
