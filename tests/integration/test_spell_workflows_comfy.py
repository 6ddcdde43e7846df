"""SPELL in the workflows people build (issue 12), in the real host, across model families.

Every case runs a real graph of host nodes twice: unshielded (its outputs become the shields: a model
reproducing protected images) and with Apply SPELL. Outputs must end at least r from every shield (model
space, at the compared size) and from each other (intra-batch); inpainting must keep the kept region
exactly the host's and protect inside the loop (small final t = 0 jump). Families: SD1.5, SDXL, SD3, Flux
(cfg 1 + FluxGuidance), WAN 2.1 video (5-D latents), tiny random models from ``model_families``.

``python tests/integration/test_spell_workflows_comfy.py`` (with COMFYUI_PATH) prints the table family x
workflow -> protected, min d/r, final-jump size.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import model_families as mf  # noqa: E402
import shield_harness as h  # noqa: E402

STEPS = 4
BATCH = 2
RADIUS_OF_RMS = 0.3          # radius as a fraction of the unshielded outputs' RMS (model space)
TOL = 1e-3                   # relative float slack on the guarantee d >= r
SMALL_FINAL_JUMP = 0.01      # final t = 0 correction, as a fraction of the latent's norm
WORKFLOWS = ("txt2img", "img2img", "inpaint", "hires", "two_pass", "dualcfg")
FAMILIES = ("sd15", "sdxl", "sd3", "flux", "wan21")

_MODELS: dict = {}


def family_model(name: str):
    if name not in _MODELS:
        _MODELS[name] = mf.FAMILIES[name].model(seed=0)
    return _MODELS[name]


def spell_kwargs(**over):
    kw = dict(radius=0.3, overcompensation=1.0, intra_batch=True, history=False, history_name="wf",
              history_size=64, start_percent=0.0, end_percent=1.0, exact=False, init_image_shield="leave it")
    kw.update(over)
    return kw


def run_node(cls, *args, **kwargs):
    """First output of a host node, classic (FUNCTION) or V3 (execute) style."""
    if hasattr(cls, "FUNCTION"):
        out = getattr(cls(), cls.FUNCTION)(*args, **kwargs)
    else:
        out = cls.execute(*args, **kwargs)
    return out.result if hasattr(out, "result") else out


def conds(fam):
    """(positive, negative) as a user would wire them; Flux gets FluxGuidance 3.5 and runs at cfg 1."""
    pos, neg = fam.conditioning(1), fam.conditioning(2)
    if fam.name == "flux":
        pos = [[c, {**d, "guidance": 3.5}] for c, d in pos]
    return pos, neg


def resize(latent: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The comparison the hook makes for another pass size (guidance.shield_resample.resample_latents)."""
    from comfyui_shielded_sampling.guidance.shield_resample import resample_latents
    return resample_latents(latent, tuple(like.shape[-2:]))


def mask_for(fam, batch: int) -> torch.Tensor:
    """A MASK [B, H, W] at pixel size freeing the right half of the image."""
    side = fam.latent_shape(1)[-1] * 8
    mask = torch.zeros(batch, side, side)
    mask[:, :, side // 2:] = 1.0
    return mask


# -- one graph per workflow ----------------------------------------------------------------------------------
def txt2img(nodes, fam, model, seed=3):
    pos, neg = conds(fam)
    return mf.ksample(nodes, fam, model, fam.empty_latent(BATCH), seed=seed, steps=STEPS, positive=pos,
                      negative=neg)["samples"]


def init_latent(fam):
    return fam.random_latent(BATCH, seed=11, scale=2.0)


def img2img(nodes, fam, model, seed=3, init=None):
    pos, neg = conds(fam)
    latent = init if init is not None else init_latent(fam)
    return mf.ksample(nodes, fam, model, latent, seed=seed, steps=STEPS, denoise=0.6, positive=pos,
                      negative=neg)["samples"]


def inpaint(nodes, fam, model, seed=3, init=None):
    pos, neg = conds(fam)
    latent = init if init is not None else init_latent(fam)
    masked = run_node(nodes.SetLatentNoiseMask, latent, mask_for(fam, BATCH))[0]
    return mf.ksample(nodes, fam, model, masked, seed=seed, steps=STEPS, positive=pos, negative=neg)["samples"]


def upscale(nodes, latent: dict) -> dict:
    side = latent["samples"].shape[-1] * 8 * 2
    if latent["samples"].dim() == 5:   # LatentUpscale is for images; video passes resize each frame
        s = latent["samples"]
        up = torch.nn.functional.interpolate(s.flatten(1, 2), scale_factor=2, mode="nearest-exact")
        return {"samples": up.reshape(*s.shape[:3], *up.shape[-2:])}
    return run_node(nodes.LatentUpscale, latent, "nearest-exact", side, side, "disabled")[0]


def hires(nodes, fam, model, seed=3):
    """The standard hires fix: KSampler -> Latent Upscale (2x) -> KSampler at denoise 0.5, same model."""
    pos, neg = conds(fam)
    first = mf.ksample(nodes, fam, model, fam.empty_latent(BATCH), seed=seed, steps=STEPS, positive=pos,
                       negative=neg)
    return mf.ksample(nodes, fam, model, upscale(nodes, first), seed=seed + 1, steps=STEPS, denoise=0.5,
                      positive=pos, negative=neg)["samples"]


def two_pass(nodes, fam, model, seed=3):
    """KSamplerAdvanced 0..2 with leftover noise, then KSamplerAdvanced 2..end without adding noise."""
    pos, neg = conds(fam)
    ks = nodes.KSamplerAdvanced()
    first = ks.sample(model, "enable", seed, STEPS, fam.cfg, "euler", fam.scheduler, pos, neg,
                      fam.empty_latent(BATCH), 0, 2, "enable")[0]
    return ks.sample(model, "disable", seed, STEPS, fam.cfg, "euler", fam.scheduler, pos, neg, first, 2, 10000,
                     "disable")[0]["samples"]


def dualcfg(nodes, fam, model, seed=3):
    """SamplerCustomAdvanced with DualCFGGuider (which adds a difference after its CFG)."""
    import comfy_extras.nodes_custom_sampler as cs
    pos, neg = conds(fam)
    middle = fam.conditioning(5)
    cfg1, cfg2 = (1.0, 1.0) if fam.name == "flux" else (3.0, 2.0)
    guider = run_node(cs.DualCFGGuider, model, pos, middle, neg, cfg1, cfg2, "regular")[0]
    noise = run_node(cs.RandomNoise, seed)[0]
    sampler = run_node(cs.KSamplerSelect, "euler")[0]
    sigmas = run_node(cs.BasicScheduler, model, fam.scheduler, STEPS, 1.0)[0]
    return run_node(cs.SamplerCustomAdvanced, noise, guider, sampler, sigmas, fam.empty_latent(BATCH))[0]["samples"]


GRAPHS = {"txt2img": txt2img, "img2img": img2img, "inpaint": inpaint, "hires": hires, "two_pass": two_pass,
          "dualcfg": dualcfg}


# -- measuring -----------------------------------------------------------------------------------------------
def model_space(model, latent: torch.Tensor) -> torch.Tensor:
    return model.model.latent_format.process_in(latent.clone().float()).flatten(1).double()


def radius_for(model, plain: torch.Tensor, shields: torch.Tensor | None = None) -> float:
    """A radius (RMS units) the unshielded outputs lie well inside: 0.3 x their RMS, or 1.25 x their distance
    to the (resized) shields when that is larger. Tests call make_patch, so the slider's maximum does not apply."""
    rms = model_space(model, plain).square().mean().sqrt().item()
    radius = RADIUS_OF_RMS * rms
    if shields is not None:
        nearest = torch.cdist(model_space(model, plain), model_space(model, resize(shields, plain))).min().item()
        radius = max(radius, 1.25 * nearest / math.sqrt(plain[0].numel()))
    return max(0.01, radius)


def min_ratio(model, out: torch.Tensor, shields: torch.Tensor, radius_rms: float, peers: bool) -> float:
    """min over outputs of d / r against every shield (and every other output with ``peers``)."""
    r = radius_rms * math.sqrt(out[0].numel())
    a = model_space(model, out)
    d = torch.cdist(a, model_space(model, resize(shields, out)))
    ratio = d.min().item() / r
    if peers and out.shape[0] > 1:
        pd = torch.cdist(a, a) + torch.eye(out.shape[0], dtype=torch.float64) * 1e30
        ratio = min(ratio, pd.min().item() / r)
    return ratio


_CASES: dict = {}


def run_case(nodes, spell_nodes, family: str, workflow: str):
    """``make_case`` once per module: several tests read the same case."""
    if (family, workflow) not in _CASES:
        _CASES[family, workflow] = make_case(nodes, spell_nodes, family, workflow)
    return _CASES[family, workflow]


def make_case(nodes, spell_nodes, family: str, workflow: str, **spell_over):
    """Unshielded run -> its outputs as shields -> the same graph with Apply SPELL. Returns a dict of results."""
    fam = mf.FAMILIES[family]
    model = family_model(family)
    graph = GRAPHS[workflow]
    plain = graph(nodes, fam, model)
    shields_latent = plain
    if workflow == "hires":   # the protected set is stored at the first pass's size
        shields_latent = resize(plain, fam.empty_latent(1)["samples"])
    shield_set = spell_nodes.LatentsToShieldSet().build({"samples": shields_latent}, "protected")[0]
    radius = radius_for(model, plain, shields_latent)
    patch = spell_nodes.make_patch("Apply SPELL", **spell_kwargs(radius=radius, shield_set=shield_set, **spell_over))
    out = graph(nodes, fam, patch.apply(model))
    report = patch.last_report
    return {"family": family, "workflow": workflow, "plain": plain, "out": out, "shields": shields_latent,
            "radius": radius, "report": report, "model": model, "fam": fam,
            "ratio": min_ratio(model, out, shields_latent, radius, peers=True),
            "plain_ratio": min_ratio(model, plain, shields_latent, radius, peers=False),
            "final_jump": max(o.final_jump for o in report.outputs)}


@pytest.fixture(scope="module")
def spell_nodes(pack):
    return h.pack_submodule("nodes.spell_nodes")


# -- protection in every workflow ------------------------------------------------------------------------------
@pytest.mark.parametrize("workflow", WORKFLOWS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_workflow_ends_outside_every_shield(comfy_nodes, spell_nodes, family, workflow):
    case = run_case(comfy_nodes, spell_nodes, family, workflow)
    assert case["plain_ratio"] < 0.9                       # unshielded: the outputs lie inside the shields
    assert case["ratio"] >= 1 - TOL, f"{family}/{workflow}: min d/r {case['ratio']:.4f}"
    assert case["out"].shape == case["plain"].shape
    # Protection came from the loop: the t = 0 jump is small (DualCFG: the guider's final prediction is
    # what SPELL corrects, so the sampler follows it).
    assert case["final_jump"] < SMALL_FINAL_JUMP, f"{family}/{workflow}: final jump {case['final_jump']:.3f}"
    assert all(o.protected_by == "loop" for o in case["report"].outputs)


# -- inpainting ------------------------------------------------------------------------------------------------
def kept_region(fam, latent: torch.Tensor) -> torch.Tensor:
    """Elements of the latent the mask keeps (left half)."""
    return latent[..., : latent.shape[-1] // 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_inpaint_keeps_the_kept_region_bit_identical(comfy_nodes, spell_nodes, family):
    case = run_case(comfy_nodes, spell_nodes, family, "inpaint")
    fam = case["fam"]
    init = init_latent(fam)["samples"]
    assert torch.equal(kept_region(fam, case["out"]), kept_region(fam, case["plain"]))
    # ComfyUI itself returns the kept region through process_latent_in/out and the last Euler step: equal to
    # the input up to float rounding (SPELL adds nothing to that: the line above is bit-for-bit).
    torch.testing.assert_close(kept_region(fam, case["plain"]), kept_region(fam, init), rtol=1e-5, atol=1e-5)
    # The masked half moved (inside the loop: the final jump is small) and carries the whole protection.
    masked = case["out"][..., init.shape[-1] // 2:] - case["plain"][..., init.shape[-1] // 2:]
    assert masked.abs().amax() > 0
    assert case["ratio"] >= 1 - TOL and case["final_jump"] < SMALL_FINAL_JUMP
    steps = case["report"].steps
    assert any(s.corrected for s in steps if s.sigma > 0)
    assert case["report"].movable_fraction == [0.5] * BATCH


def stub_vae(channels: int):
    """A duck-typed VAE for the host's inpaint encoders: 8x average pool and a fixed 3 -> C map."""
    gen = torch.Generator().manual_seed(5)
    proj = torch.randn(channels, 3, generator=gen)

    class StubVae:
        downscale_ratio = 8

        def spacial_compression_encode(self):
            return 8

        def encode(self, pixels):
            x = torch.nn.functional.avg_pool2d(pixels[..., :3].movedim(-1, 1), 8)
            return torch.einsum("cd,bdhw->bchw", proj, x) * 4.0
    return StubVae()


@pytest.mark.parametrize("encoder", ["VAEEncodeForInpaint", "InpaintModelConditioning"])
@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_inpaint_encoders_protect_inside_the_mask(comfy_nodes, spell_nodes, family, encoder):
    """VAE Encode for Inpainting and InpaintModelConditioning (noise mask) take the same masked path."""
    fam = mf.FAMILIES[family]
    model = family_model(family)
    side = fam.latent_shape(1)[-1] * 8
    pixels = torch.rand(BATCH, side, side, 3, generator=torch.Generator().manual_seed(2))
    mask = mask_for(fam, BATCH)
    vae = stub_vae(fam.channels)
    pos, neg = conds(fam)
    if encoder == "VAEEncodeForInpaint":
        latent = run_node(comfy_nodes.VAEEncodeForInpaint, vae, pixels, mask, 0)[0]
    else:
        pos, neg, latent = run_node(comfy_nodes.InpaintModelConditioning, pos, neg, pixels, vae, mask, True)[:3]

    def sample(m):
        return mf.ksample(comfy_nodes, fam, m, latent, seed=4, steps=STEPS, positive=pos, negative=neg)["samples"]
    plain = sample(model)
    radius = radius_for(model, plain)
    shields = spell_nodes.LatentsToShieldSet().build({"samples": plain}, "p")[0]
    patch = spell_nodes.make_patch("Apply SPELL", **spell_kwargs(radius=radius, shield_set=shields))
    out = sample(patch.apply(model))
    assert min_ratio(model, out, plain, radius, peers=True) >= 1 - TOL
    assert torch.equal(out[..., : out.shape[-1] // 2], plain[..., : out.shape[-1] // 2])
    assert max(o.final_jump for o in patch.last_report.outputs) < SMALL_FINAL_JUMP


SD15_INPAINT = mf.Family("sd15_inpaint", "SD15", lambda: {**mf.sd15_config(), "in_channels": 9}, channels=4,
                         pooled=False, frames=None, output_layer="out.2", cfg=5.0)


def test_real_inpaint_model_with_nine_input_channels(comfy_nodes, spell_nodes):
    """An SD1.5-inpainting-config UNet (in_channels 9: latent + mask + masked image, concatenated by the host)
    through InpaintModelConditioning with its noise mask: every output ends >= r from every shield and from the
    other output, the kept region is bit-identical to the host's unshielded run (and the input up to float
    rounding), the masked half moves inside the loop and the final t = 0 correction is small."""
    fam = SD15_INPAINT
    model = fam.model(seed=0)
    assert model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 9
    assert model.model.concat_keys == ("mask", "masked_image")      # the host's inpaint model path
    side = fam.latent_shape(1)[-1] * 8
    pixels = torch.rand(BATCH, side, side, 3, generator=torch.Generator().manual_seed(2))
    pos, neg = conds(fam)
    pos, neg, latent = run_node(comfy_nodes.InpaintModelConditioning, pos, neg, pixels, stub_vae(4),
                                mask_for(fam, BATCH), True)[:3]
    assert "concat_latent_image" in pos[0][1] and "noise_mask" in latent

    def sample(m):
        return mf.ksample(comfy_nodes, fam, m, latent, seed=4, steps=STEPS, positive=pos, negative=neg)["samples"]
    plain = sample(model)
    radius = radius_for(model, plain)
    shields = spell_nodes.LatentsToShieldSet().build({"samples": plain}, "catalogue")[0]
    patch = spell_nodes.make_patch("Apply SPELL", **spell_kwargs(radius=radius, shield_set=shields))
    out = sample(patch.apply(model))
    report = patch.last_report
    half = out.shape[-1] // 2
    assert min_ratio(model, out, plain, radius, peers=True) >= 1 - TOL
    assert torch.equal(out[..., :half], plain[..., :half])
    torch.testing.assert_close(plain[..., :half], latent["samples"][..., :half], rtol=1e-5, atol=1e-5)
    assert (out[..., half:] - plain[..., half:]).abs().amax() > 0
    assert any(s.corrected for s in report.steps if s.sigma > 0)
    assert max(o.final_jump for o in report.outputs) < SMALL_FINAL_JUMP
    assert all(o.protected_by == "loop" for o in report.outputs)
    assert report.movable_fraction == [0.5] * BATCH


def test_inpaint_with_an_empty_mask_reports_that_nothing_can_move(comfy_nodes, spell_nodes, caplog):
    fam = mf.FAMILIES["sd15"]
    model = family_model("sd15")
    latent = init_latent(fam)
    masked = run_node(comfy_nodes.SetLatentNoiseMask, latent, torch.zeros(BATCH, 32, 32))[0]
    pos, neg = conds(fam)
    plain = mf.ksample(comfy_nodes, fam, model, masked, seed=3, steps=STEPS, positive=pos, negative=neg)["samples"]
    shields = spell_nodes.LatentsToShieldSet().build({"samples": plain}, "p")[0]
    patch = spell_nodes.make_patch("Apply SPELL", **spell_kwargs(radius=radius_for(model, plain),
                                                                 shield_set=shields, intra_batch=False))
    with caplog.at_level("WARNING", logger="shielded_sampling"):
        out = mf.ksample(comfy_nodes, fam, patch.apply(model), masked, seed=3, steps=STEPS, positive=pos,
                         negative=neg)["samples"]
    assert torch.equal(out, plain)
    assert "inpainting mask is empty" in caplog.text
    report = patch.last_report
    assert all(o.distance < report.radius for o in report.outputs) and "2 inside a shield" in report.summary()


def test_inpaint_soft_mask_with_differential_diffusion(comfy_nodes, spell_nodes):
    """A soft (gradient) mask under Differential Diffusion, whose per-step mask SPELL must use too."""
    import comfy_extras.nodes_differential_diffusion as dd
    fam = mf.FAMILIES["sd3"]
    base = run_node(dd.DifferentialDiffusion, family_model("sd3"), 1.0)[0]
    side = fam.latent_shape(1)[-1] * 8
    mask = torch.linspace(-1.0, 1.0, side).clamp_min(0).expand(BATCH, side, side).contiguous()  # 0 on the left
    latent = run_node(comfy_nodes.SetLatentNoiseMask, init_latent(fam), mask)[0]
    pos, neg = conds(fam)

    def sample(m):
        return mf.ksample(comfy_nodes, fam, m, latent, seed=3, steps=STEPS, positive=pos, negative=neg)["samples"]
    plain = sample(base)
    radius = radius_for(base, plain)
    shields = spell_nodes.LatentsToShieldSet().build({"samples": plain}, "p")[0]
    patch = spell_nodes.make_patch("Apply SPELL", **spell_kwargs(radius=radius, shield_set=shields))
    out = sample(patch.apply(base))
    assert min_ratio(base, out, plain, radius, peers=True) >= 1 - TOL
    assert torch.equal(kept_region(fam, out), kept_region(fam, plain))
    assert max(o.final_jump for o in patch.last_report.outputs) < SMALL_FINAL_JUMP


def test_inpaint_history_repels_from_earlier_inpaints(comfy_nodes, spell_nodes):
    """history on: the second inpaint of the same image ends >= r from the first, moving only the mask."""
    fam = mf.FAMILIES["sd3"]
    model = family_model("sd3")
    history = h.pack_submodule("guidance.history")
    history.clear("inpaint-hist")
    plain = inpaint(comfy_nodes, fam, model)
    radius = radius_for(model, plain)
    patch = spell_nodes.make_patch("Apply SPELL", **spell_kwargs(radius=radius, intra_batch=False, history=True,
                                                                 history_name="inpaint-hist"))
    first = inpaint(comfy_nodes, fam, patch.apply(model))
    second = inpaint(comfy_nodes, fam, patch.apply(model))
    history.clear("inpaint-hist")
    assert torch.equal(first, plain)                       # empty history, batch peers off: nothing to do
    assert patch.last_report.history_count == BATCH
    assert min_ratio(model, second, first, radius, peers=False) >= 1 - TOL
    assert torch.equal(kept_region(fam, second), kept_region(fam, plain))
    assert max(o.final_jump for o in patch.last_report.outputs) < SMALL_FINAL_JUMP


# -- img2img from a protected image --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "flux", "wan21"])
def test_img2img_from_a_shield_leave_or_exclude(comfy_nodes, spell_nodes, family):
    """The init image is itself a shield: 'leave it' moves the output >= r away from it; 'exclude it' does not,
    while another shield (near the outputs, not containing the init image) still holds."""
    fam = mf.FAMILIES[family]
    model = family_model(family)
    init = init_latent(fam)
    plain = img2img(comfy_nodes, fam, model, init=init)
    p_plain, p_init = model_space(model, plain), model_space(model, init["samples"])
    d_plain = (p_plain - p_init).norm(dim=1)
    radius = 1.25 * d_plain.max().item() / math.sqrt(plain[0].numel())   # the edit stays inside the init's shield
    r = radius * math.sqrt(plain[0].numel())
    # Beyond each output, away from the init image: within r of the output, at least r from the init image.
    fmt = model.model.latent_format
    other = fmt.process_out((p_plain + 0.6 * (p_plain - p_init)).float().reshape(plain.shape))
    assert ((model_space(model, other) - p_init).norm(dim=1) >= r).all()
    shield_latents = torch.cat([init["samples"], other])
    results = {}
    for choice in ("leave it", "exclude it"):
        shields = spell_nodes.LatentsToShieldSet().build({"samples": shield_latents}, "catalogue")[0]
        # exact: the init's shield and the other one overlap around the output, where eq. 5's pushes cancel
        patch = spell_nodes.make_patch("Apply SPELL", **spell_kwargs(radius=radius, shield_set=shields, exact=True,
                                                                     intra_batch=False, init_image_shield=choice))
        out = img2img(comfy_nodes, fam, patch.apply(model), init=init)
        results[choice] = (out, patch.last_report)
    leave, leave_report = results["leave it"]
    exclude, exclude_report = results["exclude it"]
    assert leave_report.init_inside == BATCH and not leave_report.init_excluded and "left" in leave_report.summary()
    assert min_ratio(model, leave, shield_latents, radius, peers=False) >= 1 - TOL
    assert exclude_report.init_excluded and "excluded" in exclude_report.summary()
    assert min_ratio(model, exclude, other, radius, peers=False) >= 1 - TOL          # other shields hold
    d_excl = (model_space(model, exclude) - p_init).norm(dim=1)
    assert (d_excl < r).all()                                # stays close to the image being edited


def test_init_image_shield_rejects_an_unknown_choice(spell_nodes):
    with pytest.raises(ValueError, match=r"Apply SPELL: input 'init_image_shield' must be one of"):
        spell_nodes.make_patch("Apply SPELL", **spell_kwargs(init_image_shield="ignore"))


# -- hires fix -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_hires_fix_reuses_one_apply_spell_for_both_passes(comfy_nodes, spell_nodes, family):
    """KSampler -> Latent Upscale -> KSampler (denoise 0.5) with the same Apply SPELL model: no shape error, the
    second pass compares with the shields resized to its size, both passes leave the shields."""
    case = run_case(comfy_nodes, spell_nodes, family, "hires")
    assert case["out"].shape[-1] == 2 * case["shields"].shape[-1]
    assert case["ratio"] >= 1 - TOL
    assert case["report"].elements == case["out"][0].numel()   # the report is the second pass's


def test_shields_of_another_frame_count_name_the_frames(comfy_nodes, spell_nodes):
    fam = mf.FAMILIES["wan21"]
    shields = spell_nodes.LatentsToShieldSet().build({"samples": torch.zeros(2, 16, 5, 4, 4)}, "clips")[0]
    patch = spell_nodes.make_patch("Apply SPELL", **spell_kwargs(shield_set=shields))
    with pytest.raises(ValueError, match=r"shields have 5 latent frames but the sampled latent has 3"):
        txt2img(comfy_nodes, fam, patch.apply(family_model("wan21")))


# -- DualCFGGuider -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_dng_refuses_a_guider_that_combines_predictions_itself(comfy_nodes, family):
    """DNG's concept is batched with CFG's positive; DualCFGGuider never asks for it: a clear error, not a no-op."""
    dng_nodes = h.pack_submodule("nodes.dng_nodes")
    fam = mf.FAMILIES[family]
    model = dng_nodes.DynamicNegativeGuidance().apply(
        family_model(family), concept=fam.conditioning(9), scale=4.0, prior=0.3, temperature=0.2, offset=0.002,
        p_max=0.9, p_min=1e-6, start_percent=0.0, end_percent=1.0, mode="dynamic")[0]
    with pytest.raises(ValueError, match=r"Dynamic Negative Guidance: the guider Guider_DualCFG combines its "
                                         r"predictions itself .* Dynamic Negative Guider node"):
        dualcfg(comfy_nodes, fam, model)


# -- report --------------------------------------------------------------------------------------------------
def test_report_tells_loop_protection_from_a_final_jump(comfy_nodes, spell_nodes):
    """A sampler whose output is not its last prediction (UniPC) may need a t = 0 correction; the report gives
    its size per output, equal to the measured change."""
    from comfyui_shielded_sampling.guidance.spell_record import OutputRecord
    rec = OutputRecord(index=0, nearest_shield=0, distance=1.0, repelled=True, final_jump=0.4)
    assert rec.protected_by == "final jump"
    assert OutputRecord(index=0, nearest_shield=0, distance=1.0, repelled=True).protected_by == "loop"
    case = run_case(comfy_nodes, spell_nodes, "sd15", "txt2img")
    summary = case["report"].summary()
    assert "final t=0 jump max" in summary and "(0 protected by it)" in summary


def table(nodes, spell_nodes) -> list[str]:
    """Markdown table family x workflow -> protected, min d/r, final-jump size (cases made once per module)."""
    rows = [f"| family | {' | '.join(WORKFLOWS)} |", "|---|" + "---|" * len(WORKFLOWS)]
    for family in FAMILIES:
        cells = []
        for workflow in WORKFLOWS:
            case = run_case(nodes, spell_nodes, family, workflow)
            ok = "yes" if case["ratio"] >= 1 - TOL else "NO"
            cells.append(f"{ok}, {case['ratio']:.4f}, {100 * case['final_jump']:.2g}%")
        rows.append(f"| {family} | {' | '.join(cells)} |")
    return rows


def test_workflow_table(comfy_nodes, spell_nodes, capsys):
    """Every family x workflow protected (cells: protected, min d/r, final t = 0 jump); printed with -s."""
    rows = table(comfy_nodes, spell_nodes)
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    assert not any("NO," in row for row in rows)


if __name__ == "__main__":
    comfy = h.boot_comfy()
    h.load_pack()
    print("\n".join(table(comfy, h.pack_submodule("nodes.spell_nodes"))))
