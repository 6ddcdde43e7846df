"""SPELL for one WebUI sampling pass: the post-CFG correction, the t = 0 step and the report.

Host-neutral: the Forge hook (``forge_hook``) calls :meth:`SpellRun.post_cfg` as a post-CFG function, the
A1111 hook (``a1111_hook``) calls :meth:`SpellRun.correct` from ``on_cfg_after_cfg``. One ``SpellRun`` lives
for one sampling pass (a batch of one generation, or its hires pass) and is never reused. The math is
``guidance.spell``; this file only decides where it applies and records what it did.
"""
from __future__ import annotations

import logging
import math

import torch

from guidance import history, spell
from guidance.shield_views import AffineShields, ConcatShields, ExcludedShields
from guidance.spell_record import OutputRecord, SpellReport, step_record
from guidance.window import SigmaWindow

from .settings import SCRIPT, DEFAULT_HISTORY_CAP, INIT_EXCLUDE, ShieldedSettings, raw_radius

LOG = logging.getLogger("shielded_sampling")


def model_space(source, scale: float, shift: float):
    """A VAE-latent shield source seen in the sampler's space ``scale * (latent - shift)``."""
    if source is None:
        return None
    if scale == 1.0 and shift == 0.0:
        return source
    return AffineShields(source, scale, shift)


class SpellRun:
    """Per-pass state: shields in the sampler's space, raw radius, active window, report."""

    def __init__(self, settings: ShieldedSettings, item_shape: tuple, scale: float, shift: float,
                 shield_set=None, window: SigmaWindow = SigmaWindow(), shield_name: str = ""):
        self.settings = settings
        self.item_shape = tuple(item_shape)
        self.scale, self.shift = float(scale), float(shift)
        sources = []
        self.shield_count = len(shield_set) if shield_set is not None else 0
        if self.shield_count:
            sources.append(shield_set)
        hist = history.source(settings.history_name.strip(), self.item_shape) if settings.history else None
        self.history_count = len(hist) if hist is not None else 0
        if hist is not None:
            sources.append(hist)
        self.source = model_space(ConcatShields(sources), self.scale, self.shift) if sources else None
        self.elements = int(math.prod(self.item_shape))
        self.radius = raw_radius(settings.radius_rms, self.elements)
        self.window = window
        self.repelled: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None    # inpainting: the host's nmask (1 = repainted), None without one
        self.kept: torch.Tensor | None = None    # ... and the latent it keeps where the mask is 0
        self.stuck = 0                           # ... inside a shield with nothing movable, at the latest evaluation
        self.unmovable = 0                       # ... and at the final t = 0 step
        self.evaluations = 0
        self.closest_pair = math.inf             # intra-batch: the closest two outputs (L2), after the t = 0 step
        self.hires = False                       # a hires-fix second pass (the A1111 callbacks tell passes apart)
        self.finished = False
        self.report = SpellReport(radius=self.radius, radius_rms=settings.radius_rms,
                                  overcompensation=settings.overcompensation, elements=self.elements, sigmas=[],
                                  shield_count=self.shield_count, history_count=self.history_count,
                                  intra_batch=settings.intra_batch, exact=settings.exact,
                                  shield_set_name=shield_name)

    # -- img2img / inpainting inputs --------------------------------------------------------------------
    def attach_inpaint(self, nmask: torch.Tensor, kept: torch.Tensor):
        """The host's inpainting blend ``x0_hat * nmask + kept * (1 - nmask)``: only masked elements may move."""
        self.kept = kept.detach().float()
        self.mask = nmask.detach().float().expand_as(self.kept)
        movable = (self.mask > spell.MOVABLE_MASK).flatten(1).float().mean(1)
        self.report.movable_fraction = [float(v) for v in movable.tolist()]

    def attach_init(self, init_latent: torch.Tensor):
        """An img2img input inside shields: leave them (the output is pushed out) or leave them out of this run."""
        if self.source is None:
            return
        inside = self.source.within(init_latent.detach().float(), self.radius)
        self.report.init_inside = int(inside.shape[0])
        if not self.report.init_inside:
            return
        if self.settings.init_image_shield == INIT_EXCLUDE:
            self.source = ExcludedShields(self.source, inside)
            self.report.init_excluded = True
            LOG.info("%s: the input image lies inside %d shield(s); 'exclude it' leaves them out of this run",
                     SCRIPT, self.report.init_inside)
        else:
            LOG.info("%s: the input image lies inside %d shield(s); the output is moved at least the radius away "
                     "from them", SCRIPT, self.report.init_inside)

    # -- per model evaluation ------------------------------------------------------------------------
    def in_window(self, sigma: float) -> bool:
        return sigma in self.window

    def post_cfg(self, args: dict) -> torch.Tensor:
        """Forge-family post-CFG function: ``args`` has ``denoised`` (x0_hat), ``input`` (x_t) and ``sigma``."""
        denoised = args["denoised"]
        sigma = float(args["sigma"].flatten()[0])
        self.evaluations += 1
        if not self.in_window(sigma):
            self.record_step(sigma, denoised, args["input"], None)
            return denoised
        return self.correct(denoised, args["input"], sigma)

    def correct(self, x0_hat: torch.Tensor, x_t: torch.Tensor, sigma: float, blended: bool = False,
                final: bool = False) -> torch.Tensor:
        """SPELL on ``x0_hat``; with an inpainting mask on what the host keeps of it: the Forge post-CFG function
        comes before the host's blend, ``blended`` predictions (A1111's callback, the final samples) after it.
        The ``final`` (t = 0) step always uses exact rounds (outside every shield, overlapping ones included)."""
        s = self.settings
        exact = s.exact or final
        if tuple(x0_hat.shape[1:]) != self.item_shape:
            raise RuntimeError(f"{SCRIPT}: the sampler's latent is {tuple(x0_hat.shape[1:])} but this pass was "
                               f"prepared for {self.item_shape}; the generation is stopped rather than left "
                               f"unshielded")
        intra = s.intra_batch and x0_hat.shape[0] > 1
        if self.source is None and not intra:
            self.record_step(sigma, x0_hat, x_t, None)
            return x0_hat
        if self.mask is None:
            result = spell.sparse_repellency(x0_hat, self.radius, shields=self.source, intra_batch=intra,
                                             overcompensation=s.overcompensation, exact=exact)
            self.record_step(sigma, x0_hat, x_t, result)
            return result.denoised
        mask = self.mask.to(x0_hat.device, x0_hat.dtype).expand_as(x0_hat)
        movable = mask > spell.MOVABLE_MASK
        kept = x0_hat if blended else spell.inpaint_blend(x0_hat, mask, self.kept.to(x0_hat.device, x0_hat.dtype))
        result = spell.sparse_repellency(kept, self.radius, shields=self.source, intra_batch=intra,
                                         overcompensation=s.overcompensation, exact=exact, movable=movable)
        self.record_step(sigma, kept, x_t, result)
        self.stuck = int((result.inside.cpu() & ~movable.flatten(1).any(1).cpu()).sum())
        return result.denoised if blended else spell.unblended_prediction(x0_hat, result.delta, mask, movable)

    def record_step(self, sigma: float, x0_hat, x_t, result):
        record, active = step_record(len(self.report.steps), sigma, x0_hat, x_t, result)
        b = record.batch
        self.repelled = active.clone() if self.repelled is None or self.repelled.shape[0] != b else self.repelled | active
        self.report.sigmas.append(sigma)
        self.report.steps.append(record)

    # -- end of the pass -------------------------------------------------------------------------------
    def finish(self, samples: torch.Tensor) -> torch.Tensor:
        """The t = 0 step on the final latents (sampler space), the output records and the history update."""
        if self.finished:
            return samples
        self.finished = True
        if self.settings.end_percent >= 1.0:
            samples = self.correct(samples, samples, 0.0, blended=True, final=True)
            self.unmovable = self.stuck
        self.record_outputs(samples)
        if self.settings.history:
            latents = samples.detach().float().cpu() / self.scale + self.shift
            history.add(self.settings.history_name.strip(), latents, DEFAULT_HISTORY_CAP)
        LOG.info("%s: %s", SCRIPT, self.report.summary())
        return samples

    def record_outputs(self, samples: torch.Tensor):
        b = samples.shape[0]
        repelled = self.repelled if self.repelled is not None else torch.zeros(b, dtype=torch.bool)
        if self.source is not None:
            dist, idx = self.source.nearest(samples.float(), self.report.nearest_reach())
            dist, idx = dist.cpu().tolist(), idx.cpu().tolist()
        else:
            dist, idx = [math.inf] * b, [-1] * b
        if self.settings.intra_batch and b > 1:
            flat = samples.detach().flatten(1).float()
            self.closest_pair = float(torch.cdist(flat, flat).fill_diagonal_(math.inf).min())
        self.report.outputs = [OutputRecord(index=i, nearest_shield=idx[i] if idx[i] < self.shield_count else -1,
                                            distance=float(dist[i]), repelled=bool(repelled[i]))
                               for i in range(b)]

    def outputs_inside(self) -> int:
        return self.report.outputs_inside()

    def result(self) -> str:
        """The infotext's short record of this pass: corrected samples, nearest shield, outputs inside."""
        r = self.report
        corrected = int(self.repelled.sum()) if self.repelled is not None else 0
        nearest = min((o.distance for o in r.outputs), default=math.inf)
        none = r.no_nearest_text() if r.shield_count or r.history_count else "no shield"
        near = f"nearest {nearest / math.sqrt(self.elements):.4g} rms" if math.isfinite(nearest) else none
        pair = f", closest pair {self.closest_pair / math.sqrt(self.elements):.4g} rms" \
            if math.isfinite(self.closest_pair) else ""
        return (f"{corrected}/{len(r.outputs)} corrected, {near}{pair}, {self.outputs_inside()} inside, "
                f"{self.shield_count} shields + {self.history_count} history")

    def summary(self) -> str:
        """One line for under the image: corrected samples and the nearest shield distance (RMS units too)."""
        r = self.report
        corrected = int(self.repelled.sum()) if self.repelled is not None else 0
        nearest = min((o.distance for o in r.outputs), default=math.inf)
        near = r.no_nearest_text() if not math.isfinite(nearest) else \
            f"nearest shield {nearest / math.sqrt(self.elements):.4g} rms ({nearest:.4g} L2)"
        text = (f"{SCRIPT}: r = {r.radius_rms:.4g} rms ({r.radius:.4g} L2), {corrected}/{len(r.outputs)} samples "
                f"corrected over {len(r.steps)} model evaluations, {near}, {self.outputs_inside()} inside, "
                f"{self.shield_count} shields + {self.history_count} history")
        if math.isfinite(self.closest_pair):
            text += f"; closest pair in the batch {self.closest_pair / math.sqrt(self.elements):.4g} rms"
        if r.init_inside:
            text += (f"; the input image lies inside {r.init_inside} shield(s), "
                     f"{'excluded from this run' if r.init_excluded else 'the output is kept out of them'}")
        if r.movable_fraction:
            text += f"; inpainting: the mask frees {100 * min(r.movable_fraction):.3g}% of the latent"
        if self.unmovable:
            text += (f"; {self.unmovable} output(s) INSIDE a shield cannot move: the inpainting mask frees nothing "
                     f"there; widen the mask")
        return text
