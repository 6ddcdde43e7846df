"""SPELL inside ComfyUI's sampler: a ``PREDICT_NOISE`` wrapper plus a ``SAMPLER_SAMPLE`` wrapper.

The ``PREDICT_NOISE`` wrapper sees the guider's final prediction ``denoised`` (the paper's ``x0_hat``) in
the model's latent space, after every post-CFG function and after whatever a guider does with it
(DualCFGGuider adds a second difference after its CFG): SPELL corrects the prediction the sampler will
use, under KSampler, KSamplerAdvanced and SamplerCustom(Advanced) with any guider. The ``SAMPLER_SAMPLE``
wrapper runs once around each sampler run: it creates the per-run state (shields mapped into the model's
space and resized to the latent's height/width, the init image, the inpainting mask, the schedule, the
report), and at the end of a run that reaches sigma = 0 it applies the correction once more to the final
latents (the t = 0 step of the chain, which matters for multistep samplers such as UniPC whose output is
not the last prediction) and adds the outputs to the history.

Inpainting. With a noise mask ``m`` ComfyUI replaces the prediction by ``x0_hat m + L (1 - m)`` (``L`` the
input latent) after the guider returns. SPELL measures that blend, moves only the elements the mask lets
change (``m > MOVABLE_MASK``) and returns the prediction whose blend is the corrected one, so the kept
region stays exactly the host's and the protection happens inside the loop.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..guidance import history as spell_history
from ..guidance import spell
from ..guidance.shield_resample import resample_mismatch
from ..guidance.shield_views import ConcatShields, ExcludedShields, model_space
from ..guidance.shields import ShieldSource
from ..guidance.spell_record import OutputRecord, SpellReport, step_record
from ..guidance.window import SigmaWindow
from .hooks import WRAPPERS, check_percents, sigma_window
from .run_state import find_run_state, keep_run_state, state_key

LOG = logging.getLogger("shielded_sampling")
INIT_LEAVE = "leave it"            # init_image_shield choices
INIT_EXCLUDE = "exclude it"
INIT_CHOICES = (INIT_LEAVE, INIT_EXCLUDE)


def raw_radius(radius_rms: float, elements: int) -> float:
    """Slider units (RMS distance per latent element) to the paper's raw L2 radius."""
    return radius_rms * math.sqrt(elements)


@dataclass
class SpellSettings:
    node: str                       # node name used in error messages
    radius_rms: float
    overcompensation: float = 1.0
    intra_batch: bool = False
    history: bool = False
    history_name: str = "default"
    history_cap: int = spell_history.DEFAULT_CAP
    start_percent: float = 0.0
    end_percent: float = 1.0
    exact: bool = False
    shield_set: object = None       # nodes.shield_set.ShieldSet or None
    init_image_shield: str = INIT_LEAVE  # img2img/inpaint from a shielded image: leave its shield or exclude it

    def validate(self):
        def fail(inp, msg):
            raise ValueError(f"{self.node}: input '{inp}' {msg}")
        if not (math.isfinite(self.radius_rms) and self.radius_rms > 0):
            fail("radius", f"must be > 0 (got {self.radius_rms}); use a value such as 0.2 or run the calibration")
        if not (math.isfinite(self.overcompensation) and self.overcompensation > 0):
            fail("overcompensation", f"must be > 0 (got {self.overcompensation}); 1.0 is the paper's exact push")
        check_percents(self.node, self.start_percent, self.end_percent)
        if self.history and not self.history_name.strip():
            fail("history_name", "is empty; give the history a name such as 'default'")
        if self.init_image_shield not in INIT_CHOICES:
            fail("init_image_shield", f"must be one of {list(INIT_CHOICES)} (got {self.init_image_shield!r})")


def latent_affine(latent_format, item_shape) -> tuple[float, float] | None:
    """``(scale, shift)`` with ``process_in(x) == scale * (x - shift)`` if the format is scalar-affine."""
    zeros = torch.zeros(1, *item_shape)
    ones = torch.ones(1, *item_shape)
    at0, at1 = latent_format.process_in(zeros).float(), latent_format.process_in(ones).float()
    scale = at1 - at0
    if at0.shape != zeros.shape or not torch.allclose(scale, scale.flatten()[0]) or not torch.allclose(at0, at0.flatten()[0]):
        return None
    a, b = scale.flatten()[0].item(), at0.flatten()[0].item()
    return (a, -b / a) if a != 0 else None


def to_model_space(source: ShieldSource, latent_format, node: str) -> ShieldSource:
    """A LATENT-space shield source as seen in the model's space (``latent_format.process_in``)."""
    try:
        return model_space(source, latent_format.process_in, latent_affine(latent_format, source.item_shape))
    except ValueError as err:
        raise ValueError(f"{node}: {err}") from err


def shields_for_shape(settings: SpellSettings, latent_shape: tuple, cache: dict):
    """The shield set's LATENT-space source at ``latent_shape``: as is, or resized to its height/width.

    A hires-fix or two-pass graph samples the same model at another resolution; the shields are then
    compared at that pass's size (bilinear, antialiased when shrinking). Channels and frames must match.
    """
    shield_set = settings.shield_set
    if shield_set is None or len(shield_set) == 0:
        return None
    have, want = tuple(shield_set.item_shape), tuple(latent_shape)
    if have == want:
        return shield_set.source
    got, need = "x".join(map(str, have)), "x".join(map(str, want))
    if len(have) != len(want) or have[:-2] != want[:-2]:
        raise ValueError(f"{settings.node}: input 'shield_set' holds latents of shape {got} but the sampled latent "
                         f"is {need}: {resample_mismatch(have, want)}; build the shield set with the same model "
                         f"family and frame count as the latent you sample")
    if want not in cache:
        try:
            cache[want] = shield_set.source.resampled(want)
        except ValueError as err:
            raise ValueError(f"{settings.node}: input 'shield_set' ({got}) cannot be compared with the sampled "
                             f"latent ({need}): {err}; load the shield set at this pass's width/height (a second "
                             f"Shield Set Loader) and give this pass its own Apply SPELL") from err
        LOG.info("%s: shields of %s resized to %s (height x width of this pass) for comparison",
                 settings.node, got, need)
    return cache[want]


def effective_mask(model_options: dict, mask: torch.Tensor, sigma: torch.Tensor, guider, sigmas) -> torch.Tensor:
    """The noise mask this step uses, as ``KSamplerX0Inpaint`` computes it (differential diffusion etc.)."""
    fn = model_options.get("denoise_mask_function")
    if fn is None:
        return mask
    return fn(sigma, mask, extra_options={"model": guider, "sigmas": sigmas})


@dataclass
class RunState:
    """Everything one sampler run needs; created at the start of each run, never reused."""

    settings: SpellSettings
    source: object                  # model-space shield source or None
    shield_count: int
    history_count: int
    sigmas: list
    window: SigmaWindow
    report: SpellReport
    repelled: torch.Tensor | None = None
    warned_single: bool = False
    warned_unmovable: bool = False
    elements: int = 0
    radius: float = 0.0
    guider: object = None
    sigma_tensor: torch.Tensor | None = None
    kept: torch.Tensor | None = None          # the input latent (model space) an inpainting sampler keeps
    mask: torch.Tensor | None = None          # ComfyUI's noise mask, shape of the latent; None without one
    last_mask: torch.Tensor | None = None     # the mask of the latest model evaluation
    resized_from: tuple | None = None         # the shield set's own shape when it was resized for this pass
    init_inside: int = 0                      # shields the init image itself lies in
    init_excluded: bool = False

    def step_index(self, sigma: float) -> int:
        return min(range(len(self.sigmas)), key=lambda i: abs(self.sigmas[i] - sigma)) if self.sigmas else 0



class SpellPatch:
    """Installs SPELL on a cloned ModelPatcher; keeps the report of its latest run."""

    def __init__(self, settings: SpellSettings):
        settings.validate()
        self.settings = settings
        self.key = state_key("spell", self)
        self.last_report: SpellReport | None = None
        self._resized: dict = {}   # shield set resized per latent shape (hires passes), kept across runs

    def __deepcopy__(self, memo):
        # ComfyUI 0.3.x's ModelPatcher.clone() deep-copies model_options (later releases copy only dicts and
        # lists): keep one patch (settings, shields, report) shared either way.
        return self

    def apply(self, model_patcher):
        m = model_patcher.clone()
        m.add_wrapper_with_key(WRAPPERS.SAMPLER_SAMPLE, self.key, self.sampler_wrapper)
        m.add_wrapper_with_key(WRAPPERS.PREDICT_NOISE, self.key, self.predict_noise_wrapper)
        return m

    # -- per run -------------------------------------------------------------------------------------
    def start_run(self, guider, sigmas: torch.Tensor, noise: torch.Tensor, latent_image=None,
                  denoise_mask=None) -> RunState:
        s = self.settings
        item_shape = tuple(noise.shape[1:])
        shields = shields_for_shape(s, item_shape, self._resized)
        latent_format = guider.model_patcher.model.latent_format
        model_sampling = guider.model_patcher.model.model_sampling
        sources, shield_count, history_count = [], 0, 0
        if shields is not None:
            sources.append(shields)
            shield_count = len(shields)
        if s.history:
            hist = spell_history.source(s.history_name, item_shape)
            if hist is not None:
                sources.append(hist)
                history_count = len(hist)
        source = None
        if sources:
            merged = ConcatShields(sources).on_device(guider.model_patcher.load_device)
            source = to_model_space(merged, latent_format, s.node)
        elements = int(math.prod(item_shape))
        radius = raw_radius(s.radius_rms, elements)
        sig = [float(v) for v in sigmas.flatten().tolist()]
        report = SpellReport(radius=radius, radius_rms=s.radius_rms, overcompensation=s.overcompensation,
                             elements=elements, sigmas=sig, shield_count=shield_count,
                             history_count=history_count, intra_batch=s.intra_batch, exact=s.exact,
                             shield_set_name=getattr(s.shield_set, "name", "") or "")
        self.last_report = report
        run = RunState(settings=s, source=source, shield_count=shield_count, history_count=history_count,
                       sigmas=sig, window=sigma_window(model_sampling, s.start_percent, s.end_percent),
                       report=report,
                       elements=elements, radius=radius, guider=guider, sigma_tensor=sigmas)
        if shields is not None and tuple(shields.item_shape) != tuple(s.shield_set.item_shape):
            run.resized_from = tuple(s.shield_set.item_shape)
        self.attach_inputs(run, latent_image, denoise_mask, noise)
        return run

    def attach_inputs(self, run: RunState, latent_image, denoise_mask, noise: torch.Tensor):
        """Record the inpainting mask and handle an init image that itself lies in a shield."""
        has_init = latent_image is not None and latent_image.shape == noise.shape and bool(latent_image.abs().amax() > 0)
        if denoise_mask is not None:
            run.mask = denoise_mask.to(noise.device, torch.float32).expand(noise.shape)
            run.kept = latent_image.to(noise.device) if latent_image is not None else torch.zeros_like(noise)
            movable = (run.mask > spell.MOVABLE_MASK).flatten(1).float().mean(1)
            run.report.movable_fraction = [float(v) for v in movable.tolist()]
        if not has_init or run.source is None:
            return
        inside = run.source.within(latent_image.float(), run.radius)
        run.init_inside = int(inside.shape[0])
        run.report.init_inside = run.init_inside
        if run.init_inside == 0:
            return
        if run.settings.init_image_shield == INIT_EXCLUDE:
            run.source = ExcludedShields(run.source, inside)
            run.init_excluded = True
            run.report.init_excluded = True
            LOG.info("%s: the input latent lies inside %d shield(s); 'exclude it' leaves them out of this run, "
                     "so the output may stay close to the input image", run.settings.node, run.init_inside)
        else:
            LOG.info("%s: the input latent lies inside %d shield(s); SPELL will move the output at least the "
                     "radius away from them (set init_image_shield to 'exclude it' to edit a protected image "
                     "freely)", run.settings.node, run.init_inside)

    def sampler_wrapper(self, executor, guider, sigmas, extra_args, *args, **kwargs):
        names = ("callback", "noise", "latent_image", "denoise_mask")
        given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        run = self.start_run(guider, sigmas, given["noise"], given.get("latent_image"), given.get("denoise_mask"))
        with keep_run_state(extra_args["model_options"], self.key, run):
            samples = executor(guider, sigmas, extra_args, *args, **kwargs)
            if len(run.sigmas) and run.sigmas[-1] == 0.0:
                samples = self.finish_run(run, guider, samples)
        return samples

    def finish_run(self, run: RunState, guider, samples: torch.Tensor) -> torch.Tensor:
        """t = 0 step of the chain on the final latents, output records, history update, log line."""
        before = samples
        if run.settings.end_percent >= 1.0:
            samples = self.correct(run, samples, samples, 0.0, final=True)
        latent_format = guider.model_patcher.model.latent_format
        self.record_outputs(run, samples, before)
        if run.settings.history:
            out = latent_format.process_out(samples.detach().float().cpu())
            spell_history.add(run.settings.history_name, out, run.settings.history_cap)
        LOG.info("%s: %s", run.settings.node, run.report.summary())
        return samples

    def record_outputs(self, run: RunState, samples: torch.Tensor, before: torch.Tensor | None = None):
        """Per output: nearest shield, whether it was repelled, and the final (t = 0) jump relative to its norm."""
        before = samples if before is None else before
        jump = ((samples.float() - before.float()).flatten(1).norm(dim=1)
                / before.float().flatten(1).norm(dim=1).clamp_min(1e-12)).cpu().tolist()
        repelled = run.repelled if run.repelled is not None else torch.zeros(samples.shape[0], dtype=torch.bool)
        if run.source is not None:
            dist, idx = run.source.nearest(samples.float(), run.report.nearest_reach())
            dist, idx = dist.cpu().tolist(), idx.cpu().tolist()
        else:
            dist, idx = [math.inf] * samples.shape[0], [-1] * samples.shape[0]
        run.report.outputs = [
            OutputRecord(index=i, nearest_shield=idx[i] if 0 <= idx[i] < run.shield_count else -1,
                         distance=float(dist[i]), repelled=bool(repelled[i]), final_jump=float(jump[i]))
            for i in range(samples.shape[0])]

    # -- per model evaluation --------------------------------------------------------------------------
    def run_state(self, model_options: dict) -> RunState:
        run = find_run_state(model_options, self.key)
        if run is None:
            raise RuntimeError(f"{self.settings.node}: the sampler ran without ComfyUI's sampler wrapper; "
                               f"use KSampler, KSamplerAdvanced or SamplerCustom(Advanced)")
        return run

    def predict_noise_wrapper(self, executor, x, timestep, model_options={}, seed=None, **kwargs):
        """Correct the guider's final prediction (after post-CFG functions and guider post-processing)."""
        denoised = executor(x, timestep, model_options, seed, **kwargs)
        run = self.run_state(model_options)
        sigma = float(timestep.flatten()[0])
        if sigma not in run.window:
            return denoised
        if run.mask is not None:
            run.last_mask = effective_mask(model_options, run.mask, timestep, run.guider, run.sigma_tensor)
        return self.correct(run, denoised, x, sigma)

    def correct(self, run: RunState, x0_hat: torch.Tensor, x_t: torch.Tensor, sigma: float,
                final: bool = False) -> torch.Tensor:
        """SPELL on ``x0_hat``; with an inpainting mask on what the sampler keeps of it (see module doc).

        The ``final`` (t = 0) step always repeats the correction until the outputs are outside every shield
        (``exact`` rounds): one eq. 5 step can leave a result inside overlapping balls (history, batch peers)."""
        s = run.settings
        exact = s.exact or final
        intra = s.intra_batch and x0_hat.shape[0] > 1
        if s.intra_batch and x0_hat.shape[0] == 1 and not run.warned_single:
            LOG.info("%s: intra-batch repellency needs a batch of 2 or more; batch size 1 repels only from "
                     "the shield set and history", s.node)
            run.warned_single = True
        if run.source is None and not intra:
            self.record_step(run, sigma, x0_hat, x_t, None)
            return x0_hat
        mask = None if run.mask is None else (run.last_mask if run.last_mask is not None else run.mask)
        if mask is None:
            result = spell.sparse_repellency(x0_hat, run.radius, shields=run.source, intra_batch=intra,
                                             overcompensation=s.overcompensation, exact=exact)
            self.record_step(run, sigma, x0_hat, x_t, result)
            return result.denoised
        mask = mask.to(x0_hat.device, x0_hat.dtype)
        movable = mask > spell.MOVABLE_MASK
        # At t = 0 the samples are already what the sampler kept; in the loop the host blends after us.
        blended = x0_hat if final else spell.inpaint_blend(x0_hat, mask, run.kept.to(x0_hat.dtype))
        result = spell.sparse_repellency(blended, run.radius, shields=run.source, intra_batch=intra,
                                         overcompensation=s.overcompensation, exact=exact, movable=movable)
        self.record_step(run, sigma, blended, x_t, result)
        self.warn_unmovable(run, result, movable)
        if final:
            return result.denoised
        return spell.unblended_prediction(x0_hat, result.delta, mask, movable)

    def warn_unmovable(self, run: RunState, result, movable: torch.Tensor):
        stuck = result.inside & ~movable.flatten(1).any(1).to(result.inside.device)
        if stuck.any() and not run.warned_unmovable:
            LOG.warning("%s: %d output(s) lie inside a shield but their inpainting mask is empty, so nothing "
                        "can move them; widen the mask", run.settings.node, int(stuck.sum()))
            run.warned_unmovable = True

    def record_step(self, run: RunState, sigma: float, x0_hat, x_t, result):
        record, active = step_record(run.step_index(sigma), sigma, x0_hat, x_t, result)
        b = record.batch
        run.repelled = active.clone() if run.repelled is None or run.repelled.shape[0] != b else run.repelled | active
        run.report.steps.append(record)
