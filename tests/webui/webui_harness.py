"""Real-WebUI harness: imports an Automatic1111-family WebUI (reForge or Forge) from WEBUI_PATH in CPU mode,
loads this repository's ``scripts/shielded_sampling.py`` the way the WebUI loads an extension script, and builds a
tiny randomly initialised SD1.5-config UNet in the host's own UNet patcher, so tests run the host's real
k-diffusion sampler path (``KDiffusionSampler`` -> ``CFGDenoiser`` -> the host's ``sampling_function`` with its
post-CFG functions). The host tree is only read; everything the WebUI writes goes to a temp ``--data-dir``.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

PACK_ROOT = Path(__file__).resolve().parents[2]
if str(PACK_ROOT) not in sys.path:  # the shared tiny-model helpers; load_script puts the folder first as the WebUI does
    sys.path.append(str(PACK_ROOT))
from benchmarks.tiny_unet import CONTEXT_DIM, randomise, tiny_unet_config  # noqa: E402


def webui_path() -> Path | None:
    path = os.environ.get("WEBUI_PATH")
    return Path(path) if path and (Path(path) / "modules" / "processing.py").is_file() else None


def flavour(root: Path) -> str:
    return "forge" if (root / "backend").is_dir() else "reforge" if (root / "ldm_patched").is_dir() else "a1111"


def boot(data_dir: Path):
    """Import the WebUI's shared state with CPU options; returns ``modules.shared``."""
    root = webui_path()
    # One thread: on a shared 2-core machine torch's thread pool spins against other processes, making a tiny
    # UNet ~100x slower; the tests are about behaviour, not speed.
    torch.set_num_threads(1)
    sys.dont_write_bytecode = True  # the host tree is read-only
    sys.argv = [str(root / "webui.py"), "--data-dir", str(data_dir), "--skip-prepare-environment",
                "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--no-half-vae", "--skip-version-check",
                "--disable-safe-unpickle", "--always-cpu"]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    link_stability_ldm(data_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from modules_forge import initialization
    initialization.initialize_forge()   # the launcher's own first step: device selection from the CPU flags
    from modules import paths, shared, shared_init
    if flavour(root) == "reforge" and "Stable Diffusion XL" not in paths.paths:
        stand_in_sgm(data_dir)
    if shared.opts is None:
        shared_init.initialize()
    from modules import processing, sd_samplers  # noqa: F401  (the import order of the WebUI's start-up)
    sd_samplers.set_samplers()
    return shared


def link_stability_ldm(workdir: Path):
    """reForge's modules/paths.py looks for Stability-AI's ``ldm`` in repositories/ (cloned by its launcher) or
    in the working directory: offline it comes from the venv (stable-diffusion-sdkit), linked into ``workdir``."""
    import importlib.util
    spec = importlib.util.find_spec("ldm")
    if spec is None or not spec.submodule_search_locations:
        return
    link = workdir / "ldm"
    if not link.exists():
        link.symlink_to(Path(list(spec.submodule_search_locations)[0]), target_is_directory=True)
    os.chdir(workdir)


SGM_MODULES = ["sgm", "sgm.models", "sgm.models.diffusion", "sgm.modules", "sgm.modules.attention",
               "sgm.modules.diffusionmodules", "sgm.modules.diffusionmodules.model",
               "sgm.modules.diffusionmodules.openaimodel", "sgm.modules.diffusionmodules.denoiser_scaling",
               "sgm.modules.diffusionmodules.discretizer", "sgm.modules.encoders", "sgm.modules.encoders.modules"]


def stand_in_sgm(data_dir: Path):
    """reForge imports Stability-AI's generative-models (``sgm``, SDXL only; cloned by its launcher, on no package
    index) at start-up and patches a few of its classes. The SD1.5 sampler path never calls it: empty modules whose
    every attribute is a fresh empty class let those imports and patches run, and nothing more."""
    from modules import paths

    def any_attribute(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})

    for name in SGM_MODULES:
        module = types.ModuleType(name)
        module.__getattr__ = any_attribute
        module.__path__ = []
        sys.modules.setdefault(name, module)
    for name in SGM_MODULES[1:]:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])
    paths.paths["Stable Diffusion XL"] = str(data_dir / "generative-models")


def load_script():
    """The extension script as the WebUI loads it: the extension folder on sys.path, then ``load_module``."""
    from modules import script_loading
    if sys.path[0] != str(PACK_ROOT):        # first, as modules.scripts.load_scripts puts every extension
        sys.path[:] = [str(PACK_ROOT)] + [p for p in sys.path if p != str(PACK_ROOT)]
    return script_loading.load_module(str(PACK_ROOT / "scripts" / "shielded_sampling.py"))


def tiny_sd_model(seed: int = 0):
    """A tiny SD1.5-config model in the host's own UNet patcher (reForge's ldm_patched or Forge's backend)."""
    if flavour(webui_path()) == "forge":
        return tiny_sd_model_forge(seed)
    return tiny_sd_model_reforge(seed)


def tiny_sd_model_reforge(seed: int = 0):
    """A stand-in for ``shared.sd_model`` holding a real reForge ``UnetPatcher`` over a tiny SD1.5 UNet."""
    import ldm_patched.modules.supported_models as supported_models
    from modules_forge.unet_patcher import UnetPatcher
    from modules_forge.forge_loader import ForgeSD

    torch.manual_seed(seed)
    config = supported_models.SD15(tiny_unet_config())
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.to(torch.float32)
    randomise(model.diffusion_model, torch.Generator().manual_seed(seed), output_layer="out.2")
    unet = UnetPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    objects = ForgeSD(unet=unet, clip=None, vae=None, clipvision=None)
    sd = types.SimpleNamespace(get_learned_conditioning=random_conditioning, model=types.SimpleNamespace(conditioning_key="crossattn"),
        forge_objects=objects, forge_objects_original=objects.shallow_copy(),
        forge_objects_after_applying_lora=objects.shallow_copy(),
        alphas_cumprod=model.model_sampling.alphas_cumprod.float() if hasattr(model.model_sampling, "alphas_cumprod")
        else _alphas_cumprod(), parameterization="eps", cond_stage_key="crossattn", is_sdxl=False, is_sd1=True,
        is_sd2=False, latent_channels=4, device=torch.device("cpu"), dtype=torch.float32)
    return sd


def tiny_sd_model_forge(seed: int = 0):
    """A stand-in for ``shared.sd_model`` holding Forge's own ``UnetPatcher`` (KModel + SD1.5 eps predictor) over a
    tiny ``IntegratedUNet2DConditionModel`` and a tiny real ``IntegratedAutoencoderKL`` (latent format 0.18215)."""
    from backend.diffusion_engine.base import ForgeObjects
    from backend.modules.k_model import KModel
    from backend.modules.k_prediction import Prediction
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.patcher.unet import UnetPatcher
    from backend.patcher.vae import VAE

    torch.manual_seed(seed)
    cfg = tiny_unet_config()
    unet = IntegratedUNet2DConditionModel(
        in_channels=4, model_channels=cfg["model_channels"], out_channels=4, num_res_blocks=cfg["num_res_blocks"],
        channel_mult=cfg["channel_mult"], num_heads=cfg["num_heads"], use_spatial_transformer=True,
        transformer_depth=cfg["transformer_depth"], transformer_depth_output=cfg["transformer_depth_output"],
        transformer_depth_middle=cfg["transformer_depth_middle"], context_dim=CONTEXT_DIM)
    randomise(unet, torch.Generator().manual_seed(seed), output_layer="out.2")
    cpu = torch.device("cpu")
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = unet.offload_device = unet.initial_device = cpu
    kmodel = KModel(model=unet, diffusers_scheduler=None, k_predictor=Prediction(prediction_type="epsilon"))
    patcher = UnetPatcher(kmodel, load_device=cpu, offload_device=cpu, current_device=cpu)
    autoencoder = IntegratedAutoencoderKL(block_out_channels=(32, 32, 32, 32), latent_channels=4,
                                          down_block_types=("DownEncoderBlock2D",) * 4,
                                          up_block_types=("UpDecoderBlock2D",) * 4)
    vae = VAE(model=autoencoder, device=cpu, dtype=torch.float32)
    objects = ForgeObjects(unet=patcher, clip=None, vae=vae, clipvision=None)
    return types.SimpleNamespace(
        get_learned_conditioning=random_conditioning, model=types.SimpleNamespace(conditioning_key="crossattn"),
        forge_objects=objects, forge_objects_original=objects.shallow_copy(),
        forge_objects_after_applying_lora=objects.shallow_copy(), alphas_cumprod=_alphas_cumprod(),
        parameterization="eps", cond_stage_key="crossattn", is_sdxl=False, is_sd1=True, is_sd2=False,
        latent_channels=4, device=cpu, dtype=torch.float32, sd_checkpoint_info=None, use_distilled_cfg_scale=False)


def model_space_out(sd_model):
    """The sampler-space -> VAE-latent map of the tiny model (reForge: UNet latent format; Forge: the VAE)."""
    unet = sd_model.forge_objects.unet
    fmt = getattr(getattr(unet.model, "model_config", None), "latent_format", None)
    return fmt.process_out if fmt is not None else sd_model.forge_objects.vae.first_stage_model.process_out


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def random_conditioning(texts) -> torch.Tensor:
    """Stand-in text encoder: a fixed random context per prompt text (``[len(texts), 8, CONTEXT_DIM]``)."""
    out = []
    for text in texts:
        gen = torch.Generator().manual_seed(sum(map(ord, str(text))) + 1)
        out.append(torch.randn(8, CONTEXT_DIM, generator=gen))
    return torch.stack(out)


SAMPLERS = {"euler": "Euler", "euler_ancestral": "Euler a", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
            "ddim": "DDIM"}


class Generation:
    """One txt2img batch through the script's hooks and the host's k-diffusion sampler (what
    ``processing.process_images_inner`` does around ``p.sample`` for one batch, without VAE decoding)."""

    def __init__(self, script_module, sd_model, args: tuple, sampler: str = "euler", steps: int = 6, batch: int = 2,
                 size: int = 64, seed: int = 1, cfg: float = 5.0):
        from modules import processing, prompt_parser, scripts, sd_samplers, shared
        shared.sd_model = sd_model
        shared.opts.live_previews_enable = False
        self.script = script_module.ShieldedSamplingScript()
        self.args = tuple(args)
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=sd_model, prompt="a shielded test", negative_prompt="", steps=steps, batch_size=batch,
            width=size, height=size, sampler_name=SAMPLERS[sampler], cfg_scale=cfg, seed=seed,
            do_not_save_samples=True, do_not_save_grid=True)
        p.scheduler = "Automatic"
        if hasattr(p, "fill_fields_from_opts"):
            p.fill_fields_from_opts()   # as processing.process_images does
        p.seeds = [seed + i for i in range(batch)]
        p.subseeds = list(p.seeds)
        p.all_seeds, p.all_subseeds = list(p.seeds), list(p.subseeds)
        p.prompts, p.negative_prompts = [p.prompt] * batch, [p.negative_prompt] * batch
        p.all_prompts, p.all_negative_prompts = list(p.prompts), list(p.negative_prompts)
        p.script_args = self.args
        from modules import rng
        p.rng = rng.ImageRNG((4, size // 8, size // 8), p.seeds, subseeds=p.subseeds, subseed_strength=0.0,
                             seed_resize_from_h=0, seed_resize_from_w=0)
        self.p, self.steps, self.batch, self.size, self.seed = p, steps, batch, size, seed
        self.c = prompt_parser.get_multicond_learned_conditioning(sd_model, p.prompts, steps)
        self.uc = prompt_parser.get_learned_conditioning(sd_model, p.negative_prompts, steps)
        self.sampler = sd_samplers.create_sampler(p.sampler_name, sd_model)
        self.post_sample_args = scripts.PostSampleArgs

    def noise(self) -> torch.Tensor:
        return self.p.rng.next()    # the host's seeded noise, as StableDiffusionProcessingTxt2Img.sample draws it

    def run(self) -> torch.Tensor:
        p = self.p
        self.script.process(p, *self.args)
        x = self.noise()
        # As StableDiffusionProcessingTxt2Img.sample: each pass starts from the unpatched (LoRA-applied) objects.
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
        self.script.process_before_every_sampling(p, *self.args, x=x, noise=x, c=self.c, uc=self.uc)
        if p.modified_noise is not None:
            x, p.modified_noise = p.modified_noise, None
        p.sampler = self.sampler
        samples = self.sampler.sample(p, x, self.c, self.uc, image_conditioning=x.new_zeros(x.shape[0], 5, 1, 1))
        ps = self.post_sample_args(samples)
        self.script.post_sample(p, ps, *self.args)
        return ps.samples

    @property
    def model_evaluations(self) -> int:
        """The host's own count of CFG denoiser calls (``CFGDenoiser.step``)."""
        return self.sampler.model_wrap_cfg.step

    def run_second_pass(self, first: torch.Tensor, scale: int = 2, denoise: float = 0.6) -> torch.Tensor:
        """A hires-fix style second pass (``is_hr_pass``): the first pass's latents upscaled, re-noised and
        sampled by the host's ``sample_img2img``, with the script's hooks around it as ``sample_hr_pass`` does."""
        p = self.p
        p.is_hr_pass = True
        p.denoising_strength = denoise
        x = torch.nn.functional.interpolate(first, scale_factor=scale, mode="nearest")
        from modules import rng
        p.rng = rng.ImageRNG(x.shape[1:], p.seeds, subseeds=p.subseeds, subseed_strength=0.0,
                             seed_resize_from_h=0, seed_resize_from_w=0)    # as sample_hr_pass does
        noise = p.rng.next()
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
        self.script.process_before_every_sampling(p, *self.args, x=x, noise=noise, c=self.c, uc=self.uc)
        if p.modified_noise is not None:
            noise, p.modified_noise = p.modified_noise, None
        samples = self.sampler.sample_img2img(p, x, noise, self.c, self.uc, steps=self.steps,
                                              image_conditioning=x.new_zeros(x.shape[0], 5, 1, 1))
        ps = self.post_sample_args(samples)
        self.script.post_sample(p, ps, *self.args)
        return ps.samples


def script_runner(script, args: tuple):
    """The host's own ``ScriptRunner`` holding only this always-on script (what ``p.scripts`` is in a generation),
    so the host's ``p.sample`` and CFG denoiser call the script's hooks themselves."""
    from modules import scripts
    script.args_from, script.args_to = 0, len(args)
    script.filename = str(PACK_ROOT / "scripts" / "shielded_sampling.py")
    runner = scripts.ScriptRunner()
    runner.scripts, runner.alwayson_scripts = [script], [script]
    return runner


def half_mask(shape: tuple, soft: float = 0.5) -> torch.Tensor:
    """A latent inpainting mask as ``p.init`` builds it (``[C, h, w]``, 1 = repainted): the left half repainted,
    the column at its edge soft (``soft``), the right half kept (exactly 0)."""
    nmask = torch.zeros(shape)
    half = shape[2] // 2
    nmask[:, :, :half] = 1.0
    nmask[:, :, half - 1] = soft
    return nmask


class Img2ImgGeneration(Generation):
    """One img2img / inpainting batch through the host's own ``StableDiffusionProcessingImg2Img.sample`` (noise,
    the scripts' ``process_before_every_sampling``, ``sample_img2img`` with the CFG denoiser's mask blend, the
    final mask blend), then the scripts' ``post_sample``: what ``process_images_inner`` does for one batch after
    ``p.init`` has encoded the init image (here a given latent, sampler space) and built the latent mask."""

    def __init__(self, script_module, sd_model, args: tuple, init_latent: torch.Tensor, nmask=None,
                 denoise: float = 0.6, sampler: str = "euler", steps: int = 6, seed: int = 1, cfg: float = 5.0):
        from modules import processing, prompt_parser, rng, scripts, sd_samplers, shared
        shared.sd_model = sd_model
        shared.opts.live_previews_enable = False
        batch, size = init_latent.shape[0], init_latent.shape[-1] * 8
        self.script = script_module.ShieldedSamplingScript()
        self.args = tuple(args)
        p = processing.StableDiffusionProcessingImg2Img(
            sd_model=sd_model, prompt="a shielded test", negative_prompt="", steps=steps, batch_size=batch,
            width=size, height=size, sampler_name=SAMPLERS[sampler], cfg_scale=cfg, seed=seed, init_images=[],
            denoising_strength=denoise, do_not_save_samples=True, do_not_save_grid=True)
        p.scheduler = "Automatic"
        if hasattr(p, "fill_fields_from_opts"):
            p.fill_fields_from_opts()
        p.seeds = [seed + i for i in range(batch)]
        p.subseeds = list(p.seeds)
        p.all_seeds, p.all_subseeds = list(p.seeds), list(p.subseeds)
        p.prompts, p.negative_prompts = [p.prompt] * batch, [p.negative_prompt] * batch
        p.all_prompts, p.all_negative_prompts = list(p.prompts), list(p.negative_prompts)
        p.script_args = self.args
        p.scripts = script_runner(self.script, self.args)
        p.rng = rng.ImageRNG(tuple(init_latent.shape[1:]), p.seeds, subseeds=p.subseeds, subseed_strength=0.0,
                             seed_resize_from_h=0, seed_resize_from_w=0)
        # What p.init leaves behind for the sampler (sampler-space init latent; latent mask only when inpainting).
        p.init_latent = init_latent.clone()
        p.mask = None if nmask is None else 1.0 - nmask
        p.nmask = nmask
        p.image_conditioning = init_latent.new_zeros(batch, 5, 1, 1)
        self.p, self.steps, self.batch, self.size, self.seed = p, steps, batch, size, seed
        self.c = prompt_parser.get_multicond_learned_conditioning(sd_model, p.prompts, steps)
        self.uc = prompt_parser.get_learned_conditioning(sd_model, p.negative_prompts, steps)
        self.sampler = p.sampler = sd_samplers.create_sampler(p.sampler_name, sd_model)
        self.post_sample_args = scripts.PostSampleArgs

    def run(self) -> torch.Tensor:
        p = self.p
        self.script.process(p, *self.args)
        samples = p.sample(self.c, self.uc, p.seeds, p.subseeds, 0.0, p.prompts)
        ps = self.post_sample_args(samples)
        p.scripts.post_sample(p, ps)
        return ps.samples
