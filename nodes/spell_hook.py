"""SPELL inside ComfyUI's sampler: a post-CFG function plus a ``SAMPLER_SAMPLE`` wrapper.

The post-CFG function sees every CFG-combined prediction ``denoised`` (the paper's ``x0_hat``) in the
model's latent space, under KSampler, KSamplerAdvanced and SamplerCustom(Advanced) with any guider that
runs post-CFG functions. The wrapper runs once around each sampler run: it creates the per-run state
(shields mapped into the model's space, the schedule, the report), and at the end of a run that reaches
sigma = 0 it applies the correction once more to the final latents (the t = 0 step of the chain, which
matters for multistep samplers such as UniPC whose output is not the last prediction) and adds the
outputs to the history.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..guidance import spell
from ..guidance.report import OutputRecord, SpellReport, StepRecord
from ..guidance.shields import AffineShields, ConcatShields, TensorShields
from . import spell_history

LOG = logging.getLogger("shielded_sampling")
SAMPLER_SAMPLE = "sampler_sample"  # comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE


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

    def validate(self):
        def fail(inp, msg):
            raise ValueError(f"{self.node}: input '{inp}' {msg}")
        if not (math.isfinite(self.radius_rms) and self.radius_rms > 0):
            fail("radius", f"must be > 0 (got {self.radius_rms}); use a value such as 0.2 or run the calibration")
        if not (math.isfinite(self.overcompensation) and self.overcompensation > 0):
            fail("overcompensation", f"must be > 0 (got {self.overcompensation}); 1.0 is the paper's exact push")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            fail("start_percent/end_percent", f"must satisfy 0 <= start <= end <= 1 (got {self.start_percent}, "
                 f"{self.end_percent})")
        if self.history and not self.history_name.strip():
            fail("history_name", "is empty; give the history a name such as 'default'")


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


def to_model_space(source, latent_format, node: str):
    """A LATENT-space shield source as seen in the model's space (``latent_format.process_in``)."""
    affine = latent_affine(latent_format, source.item_shape)
    if affine is not None:
        return AffineShields(source, *affine)
    if isinstance(source, TensorShields):
        return TensorShields(latent_format.process_in(source.shields.clone()).float())
    if isinstance(source, ConcatShields):
        return ConcatShields([to_model_space(s, latent_format, node) for s in source.sources])
    raise ValueError(f"{node}: this model's latent format is not a scalar affine map, so an indexed shield set "
                     f"cannot be searched in its space; load the shields as a LATENT batch instead")


def on_device(source, device):
    """In-memory shields move to the sampling device once per run; indexed sources stay where they are."""
    if isinstance(source, TensorShields):
        return source.to(device)
    if isinstance(source, ConcatShields):
        return ConcatShields([on_device(s, device) for s in source.sources])
    return source


def check_shapes(settings: SpellSettings, latent_shape: tuple):
    shield_set = settings.shield_set
    if shield_set is None or len(shield_set) == 0:
        return
    if tuple(shield_set.item_shape) != tuple(latent_shape):
        raise ValueError(shape_mismatch(settings.node, tuple(shield_set.item_shape), tuple(latent_shape)))


AXES = {3: ("channels", "height", "width"), 4: ("channels", "frames", "height", "width")}
SAME = {"channels": "the same model family (latent channels)", "frames": "the same number of frames",
        "height": "the same height", "width": "the same width"}


def shape_mismatch(node: str, got: tuple, want: tuple) -> str:
    """The shield/latent shape error naming the axes that differ (C x H x W, or C x T x H x W for a video)."""
    def described(shape):
        names = AXES.get(len(shape))
        return "x".join(map(str, shape)) + (f" ({' x '.join(names)})" if names else "")
    head = (f"{node}: input 'shield_set' holds latents of shape {described(got)} but the sampled latent is "
            f"{described(want)}")
    if len(got) != len(want) or len(want) not in AXES:
        return f"{head}; build the shield set with the model family and latent size you sample with"
    differ = [(name, g, w) for name, g, w in zip(AXES[len(want)], got, want) if g != w]
    return (f"{head}; they differ in {', '.join(f'{n} ({g} vs {w})' for n, g, w in differ)}: build the shield set "
            f"with {' and '.join(SAME[n] for n, _, _ in differ)} as the latent you sample")


@dataclass
class RunState:
    """Everything one sampler run needs; created at the start of each run, never reused."""

    settings: SpellSettings
    source: object                  # model-space shield source or None
    shield_count: int
    history_count: int
    sigmas: list
    sigma_start: float
    sigma_end: float
    report: SpellReport
    repelled: torch.Tensor | None = None
    warned_single: bool = False
    elements: int = 0
    radius: float = 0.0

    def step_index(self, sigma: float) -> int:
        return min(range(len(self.sigmas)), key=lambda i: abs(self.sigmas[i] - sigma)) if self.sigmas else 0

    def in_window(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


class SpellPatch:
    """Installs SPELL on a cloned ModelPatcher; keeps the report of its latest run."""

    def __init__(self, settings: SpellSettings):
        settings.validate()
        self.settings = settings
        self.key = f"shielded_spell_{id(self)}"
        self.last_report: SpellReport | None = None

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: keep one patch (settings, shields, report) shared.
        return self

    def apply(self, model_patcher):
        m = model_patcher.clone()
        m.set_model_sampler_post_cfg_function(self.post_cfg)
        m.add_wrapper_with_key(SAMPLER_SAMPLE, self.key, self.sampler_wrapper)
        return m

    # -- per run -------------------------------------------------------------------------------------
    def start_run(self, guider, sigmas: torch.Tensor, noise: torch.Tensor) -> RunState:
        s = self.settings
        item_shape = tuple(noise.shape[1:])
        check_shapes(s, item_shape)
        latent_format = guider.model_patcher.model.latent_format
        model_sampling = guider.model_patcher.model.model_sampling
        sources, shield_count, history_count = [], 0, 0
        if s.shield_set is not None and len(s.shield_set) > 0:
            sources.append(s.shield_set.source)
            shield_count = len(s.shield_set)
        if s.history:
            hist = spell_history.source(s.history_name, item_shape)
            if hist is not None:
                sources.append(hist)
                history_count = len(hist)
        source = None
        if sources:
            merged = on_device(ConcatShields(sources), guider.model_patcher.load_device)
            source = to_model_space(merged, latent_format, s.node)
        elements = int(math.prod(item_shape))
        radius = raw_radius(s.radius_rms, elements)
        sig = [float(v) for v in sigmas.flatten().tolist()]
        report = SpellReport(radius=radius, radius_rms=s.radius_rms, overcompensation=s.overcompensation,
                             elements=elements, sigmas=sig, shield_count=shield_count,
                             history_count=history_count, intra_batch=s.intra_batch, exact=s.exact,
                             shield_set_name=getattr(s.shield_set, "name", "") or "")
        self.last_report = report
        return RunState(settings=s, source=source, shield_count=shield_count, history_count=history_count,
                        sigmas=sig, sigma_start=float(model_sampling.percent_to_sigma(s.start_percent)),
                        sigma_end=float(model_sampling.percent_to_sigma(s.end_percent)), report=report,
                        elements=elements, radius=radius)

    def sampler_wrapper(self, executor, guider, sigmas, extra_args, *args, **kwargs):
        noise = args[1] if len(args) > 1 else kwargs["noise"]
        run = self.start_run(guider, sigmas, noise)
        extra_args["model_options"].setdefault("transformer_options", {})[self.key] = run
        samples = executor(guider, sigmas, extra_args, *args, **kwargs)
        if len(run.sigmas) and run.sigmas[-1] == 0.0:
            samples = self.finish_run(run, guider, samples)
        return samples

    def finish_run(self, run: RunState, guider, samples: torch.Tensor) -> torch.Tensor:
        """t = 0 step of the chain on the final latents, output records, history update, log line."""
        if run.settings.end_percent >= 1.0:
            samples = self.correct(run, samples, samples, 0.0)
        latent_format = guider.model_patcher.model.latent_format
        self.record_outputs(run, samples)
        if run.settings.history:
            out = latent_format.process_out(samples.detach().float().cpu())
            spell_history.add(run.settings.history_name, out, run.settings.history_cap)
        LOG.info("%s: %s", run.settings.node, run.report.summary())
        return samples

    def record_outputs(self, run: RunState, samples: torch.Tensor):
        repelled = run.repelled if run.repelled is not None else torch.zeros(samples.shape[0], dtype=torch.bool)
        if run.source is not None:
            dist, idx = run.source.nearest(samples.float())
            dist, idx = dist.cpu().tolist(), idx.cpu().tolist()
        else:
            dist, idx = [math.inf] * samples.shape[0], [-1] * samples.shape[0]
        run.report.outputs = [
            OutputRecord(index=i, nearest_shield=idx[i] if idx[i] < run.shield_count else -1,
                         distance=float(dist[i]), repelled=bool(repelled[i]))
            for i in range(samples.shape[0])]

    # -- per model evaluation --------------------------------------------------------------------------
    def run_state(self, model_options: dict) -> RunState:
        run = model_options.get("transformer_options", {}).get(self.key)
        if run is None:
            raise RuntimeError(f"{self.settings.node}: the sampler ran without ComfyUI's sampler wrapper; "
                               f"use KSampler, KSamplerAdvanced or SamplerCustom(Advanced)")
        return run

    def post_cfg(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        run = self.run_state(args["model_options"])
        sigma = float(args["sigma"].flatten()[0])
        if not run.in_window(sigma):
            return denoised
        return self.correct(run, denoised, args["input"], sigma)

    def correct(self, run: RunState, x0_hat: torch.Tensor, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
        s = run.settings
        intra = s.intra_batch and x0_hat.shape[0] > 1
        if s.intra_batch and x0_hat.shape[0] == 1 and not run.warned_single:
            LOG.info("%s: intra-batch repellency needs a batch of 2 or more; batch size 1 repels only from "
                     "the shield set and history", s.node)
            run.warned_single = True
        if run.source is None and not intra:
            self.record_step(run, sigma, x0_hat, x_t, None)
            return x0_hat
        result = spell.sparse_repellency(x0_hat, run.radius, shields=run.source, intra_batch=intra,
                                         overcompensation=s.overcompensation, exact=s.exact)
        self.record_step(run, sigma, x0_hat, x_t, result)
        return result.denoised

    def record_step(self, run: RunState, sigma: float, x0_hat, x_t, result):
        b = x0_hat.shape[0]
        if result is None:
            rel, nearest, corrected, active, rounds = [0.0] * b, [math.inf] * b, 0, torch.zeros(b, dtype=torch.bool), 0
        else:
            # At sigma = 0 (the final t = 0 step) x_t is the prediction itself: measure against its norm.
            ref = x0_hat if sigma == 0.0 else x0_hat - x_t
            step_norm = ref.flatten(1).float().norm(dim=1).clamp_min(1e-12)
            rel = (result.delta.flatten(1).norm(dim=1) / step_norm).cpu().tolist()
            nearest = result.nearest_distance.cpu().tolist()
            active = result.active.cpu()
            corrected, rounds = int(active.sum()), result.rounds
        run.repelled = active.clone() if run.repelled is None or run.repelled.shape[0] != b else run.repelled | active
        run.report.steps.append(StepRecord(step=run.step_index(sigma), sigma=sigma, corrected=corrected, batch=b,
                                           relative_size=rel, nearest=nearest, rounds=rounds))
