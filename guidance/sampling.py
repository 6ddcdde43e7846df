"""Host-agnostic k-diffusion-style samplers with guidance plugged in as denoiser wrappers.

A *denoiser* is any callable ``model(x, sigma) -> denoised`` with ``x [B, ...]`` and ``sigma [B]``
(Karras et al. 2022, "EDM", notation: ``x = x0 + sigma * eps``, ``D(x, sigma) ~ E[x0 | x]``). The
samplers below only ever see a denoiser, so a guidance term is a wrapper around it that edits the
prediction before the sampler steps (SPELL: Kirchhof et al. 2025, Algorithm 2, line 16)::

    from guidance.sampling import karras_sigmas, sample, SpellWrapper
    guided = SpellWrapper(model, radius=20.0, shields=protected, intra_batch=True, history=True)
    sigmas = karras_sigmas(30, sigma_min=0.002, sigma_max=80.0)
    for seed in range(4):
        noise = torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(seed))
        images = sample(guided, noise, sigmas, sampler="euler")   # later batches repel from earlier ones
    guided.runs[-1]       # SpellReport of the last run (the nodes' type): reporting.plots.activity_chart draws it

Schedules: :func:`karras_sigmas` (EDM eq. 5) and :func:`ddpm_sigmas` (discrete DDPM betas seen as
sigmas, ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``). Samplers: :func:`sample_euler`,
:func:`sample_heun` (EDM Algorithm 1), :func:`sample_euler_ancestral` and :func:`sample_consistency`
(multistep consistency sampling: denoise, then re-noise to the next sigma; Song et al. 2023, Alg. 1).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from .shield_views import ConcatShields
from .shields import TensorShields
from .spell import sparse_repellency
from .spell_record import OutputRecord, SpellReport, step_record

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Schedule = Union[float, Callable[[float], float]]
Correlate = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (unit draw z, denoised, sigma) -> z'


# ----------------------------------------------------------------------------- schedules

def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM eq. 5: ``n`` sigmas from ``sigma_max`` to ``sigma_min`` spaced in ``sigma^(1/rho)``, then a final 0."""
    if n < 1 or not (0 < sigma_min < sigma_max) or rho <= 0:
        raise ValueError(f"karras_sigmas needs n >= 1, 0 < sigma_min < sigma_max, rho > 0; "
                         f"got n={n}, sigma_min={sigma_min}, sigma_max={sigma_max}, rho={rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def ddpm_sigmas(n: int, beta_start: float = 0.00085, beta_end: float = 0.012, train_steps: int = 1000,
                schedule: str = "scaled_linear") -> torch.Tensor:
    """``n`` sigmas ``sqrt((1 - abar_t) / abar_t)`` of a DDPM beta schedule at evenly spaced timesteps, then 0."""
    if n < 1 or n > train_steps or not (0 < beta_start < beta_end < 1):
        raise ValueError(f"ddpm_sigmas needs 1 <= n <= train_steps and 0 < beta_start < beta_end < 1; "
                         f"got n={n}, train_steps={train_steps}, beta_start={beta_start}, beta_end={beta_end}")
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, train_steps, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, train_steps, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"schedule must be 'linear' or 'scaled_linear', got {schedule!r}")
    alphas_bar = torch.cumprod(1 - betas, 0)
    all_sigmas = ((1 - alphas_bar) / alphas_bar).sqrt()
    idx = torch.linspace(train_steps - 1, 0, n, dtype=torch.float64).round().long()
    return torch.cat([all_sigmas[idx], all_sigmas.new_zeros(1)]).float()


# ----------------------------------------------------------------------------- samplers

def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """ODE derivative ``dx/dsigma = (x - D(x, sigma)) / sigma`` (EDM eq. 3 with sigma(t) = t)."""
    return (x - denoised) / append_dims(sigma, x.dim())


def append_dims(v: torch.Tensor, dims: int) -> torch.Tensor:
    """View a ``[B]`` tensor as ``[B, 1, ..., 1]`` with ``dims`` dims."""
    return v.reshape(v.shape + (1,) * (dims - v.dim()))


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0):
    """``(sigma_down, sigma_up)`` of an ancestral step with ``sigma_down^2 + sigma_up^2 = sigma_to^2``."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(max(0.0, sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)
                                                  / sigma_from ** 2)))
    return math.sqrt(sigma_to ** 2 - sigma_up ** 2), sigma_up


def _sigma_batch(x: torch.Tensor, sigma) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)


def _check_sigmas(sigmas: torch.Tensor):
    if sigmas.dim() != 1 or sigmas.numel() < 2 or (sigmas[1:] > sigmas[:-1]).any() or (sigmas < 0).any():
        raise ValueError(f"sigmas must be a 1-D non-increasing sequence of >= 2 non-negative values, got {sigmas}")


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback=None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (EDM Alg. 1 without the 2nd-order correction)."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = model(x, _sigma_batch(x, sigmas[i]))
        if callback is not None:
            callback(i, x, sigmas[i], denoised)
        x = x + to_d(x, _sigma_batch(x, sigmas[i]), denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback=None) -> torch.Tensor:
    """Heun's 2nd-order method (EDM Alg. 1); the last step to sigma = 0 is an Euler step."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = _sigma_batch(x, sigmas[i]), _sigma_batch(x, sigmas[i + 1])
        denoised = model(x, s)
        if callback is not None:
            callback(i, x, sigmas[i], denoised)
        d = to_d(x, s, denoised)
        dt = sigmas[i + 1] - sigmas[i]
        x_next = x + d * dt
        if sigmas[i + 1] > 0:
            d_next = to_d(x_next, s_next, model(x_next, s_next))
            x_next = x + (d + d_next) / 2 * dt
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, eta: float = 1.0,
                           generator: Optional[torch.Generator] = None, callback=None,
                           correlate: Optional[Correlate] = None) -> torch.Tensor:
    """Euler step to ``sigma_down`` then fresh noise of std ``sigma_up`` (k-diffusion ``sample_euler_ancestral``);
    ``correlate(z, denoised, sigma)`` may couple each fresh unit draw ``z`` across the batch (EDDY)."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        s = _sigma_batch(x, sigmas[i])
        denoised = model(x, s)
        if callback is not None:
            callback(i, x, sigmas[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(float(sigmas[i]), float(sigmas[i + 1]), eta)
        x = x + to_d(x, s, denoised) * (sigma_down - float(sigmas[i]))
        if sigma_up > 0:
            x = x + _fresh_noise(x, generator, correlate, denoised, float(sigmas[i])) * sigma_up
    return x


@torch.no_grad()
def sample_consistency(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, sigma_min: float = 0.0,
                       generator: Optional[torch.Generator] = None, callback=None,
                       correlate: Optional[Correlate] = None) -> torch.Tensor:
    """Multistep consistency sampling: ``x0 = f(x, sigma_i)``, then ``x = x0 + sqrt(sigma_{i+1}^2 - sigma_min^2) z``
    (``correlate`` as in ``sample_euler_ancestral``)."""
    _check_sigmas(sigmas)
    denoised = x
    for i in range(len(sigmas) - 1):
        denoised = model(x, _sigma_batch(x, sigmas[i]))
        if callback is not None:
            callback(i, x, sigmas[i], denoised)
        nxt = float(sigmas[i + 1])
        if nxt > 0:
            z = _fresh_noise(x, generator, correlate, denoised, float(sigmas[i]))
            x = denoised + z * math.sqrt(max(nxt ** 2 - sigma_min ** 2, 0.0))
    return denoised


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)


def _fresh_noise(x, generator, correlate, denoised, sigma: float) -> torch.Tensor:
    z = _randn_like(x, generator)
    return z if correlate is None else correlate(z, denoised, sigma)


SAMPLERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "euler_ancestral": sample_euler_ancestral,
    "consistency": sample_consistency,
}


def sample(model: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, sampler: str = "euler",
           **kwargs) -> torch.Tensor:
    """Sample from unit ``noise`` (scaled by ``sigmas[0]``); calls ``model.end_run(result)`` if the model has it."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    out = SAMPLERS[sampler](model, noise * sigmas[0], sigmas, **kwargs)
    end_run = getattr(model, "end_run", None)
    if callable(end_run):
        end_run(out)
    return out


# ----------------------------------------------------------------------------- SPELL as a wrapper

def _schedule_value(value: Schedule, sigma: float, name: str) -> float:
    out = float(value(sigma)) if callable(value) else float(value)
    if not (math.isfinite(out) and out >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (0 switches SPELL off), got {out!r} at sigma={sigma}")
    return out


class SpellWrapper:
    """Denoiser wrapper applying SPELL (eq. 5 + eq. 7) to every prediction; reports what it did per run.

    ``radius`` / ``overcompensation``: numbers, or callables ``sigma -> value`` (schedules; a radius
    of 0 switches SPELL off at that sigma). ``shields``: tensor ``[K, ...]``, shield source or None.
    ``history=True``: final outputs passed to :meth:`end_run` (done by :func:`sample`) become shields
    of later runs (the paper's repellency from previous batches). ``runs`` holds one
    :class:`~guidance.spell_record.SpellReport` per sampling run (the type the nodes emit; a run starts
    when sigma goes up again): one step record per denoiser call, and after :meth:`end_run` one output
    record per sample with its nearest protected shield (``-1``: nearest is a remembered output).
    """

    def __init__(self, model: Denoiser, radius: Schedule, shields=None, intra_batch: bool = False,
                 overcompensation: Schedule = 1.0, exact: bool = False, history: bool = False):
        if not callable(radius):
            _schedule_value(radius, 0.0, "radius")
        self.model = model
        self.radius, self.overcompensation = radius, overcompensation
        self.shields = TensorShields(shields) if isinstance(shields, torch.Tensor) else shields
        self.intra_batch, self.exact, self.history = bool(intra_batch), bool(exact), bool(history)
        self.remembered: list = []
        self._remembered_source = None   # built once per change: its feature screen is fitted on first use
        self.runs: list[SpellReport] = []
        self._last_sigma = -math.inf      # a call at a higher sigma than the last one opens a new run

    def shield_source(self):
        """Protected shields plus remembered outputs, as one source (None if empty)."""
        sources = [self.shields] if self.shields is not None and len(self.shields) > 0 else []
        if self.remembered:
            if self._remembered_source is None:
                self._remembered_source = TensorShields(torch.cat(self.remembered))
            sources.append(self._remembered_source)
        if not sources:
            return None
        return sources[0] if len(sources) == 1 else ConcatShields(sources)

    def new_report(self, x0_hat: torch.Tensor) -> SpellReport:
        """The report of a run that starts now; schedules fill radius and overcompensation as they are used."""
        return SpellReport(radius=0.0, radius_rms=0.0, elements=x0_hat[0].numel(), sigmas=[],
                           overcompensation=0.0 if callable(self.overcompensation) else float(self.overcompensation),
                           shield_count=len(self.shields) if self.shields is not None else 0,
                           history_count=sum(len(r) for r in self.remembered),
                           intra_batch=self.intra_batch, exact=self.exact)

    def end_run(self, final: torch.Tensor):
        """Close the current run: record its outputs; with ``history`` they become shields of the next runs."""
        if self.runs and self._last_sigma > -math.inf:
            self.runs[-1].outputs = self.output_records(final, self.runs[-1])
        if self.history:
            self.remembered.append(final.detach().float().cpu())
            self._remembered_source = None
        self._last_sigma = -math.inf

    def output_records(self, final: torch.Tensor, report: SpellReport) -> list[OutputRecord]:
        """Per output: nearest protected shield or remembered output, and whether SPELL ever moved it."""
        b = final.shape[0]
        source = self.shield_source()
        if source is None:
            dist, idx = [math.inf] * b, [-1] * b
        else:
            d, i = source.nearest(final.detach().float(), report.nearest_reach())
            dist, idx = d.cpu().tolist(), i.cpu().tolist()
        moved = report.corrected_samples().tolist()
        return [OutputRecord(index=k, nearest_shield=idx[k] if idx[k] < report.shield_count else -1,
                             distance=float(dist[k]), repelled=bool(moved[k]) if k < len(moved) else False)
                for k in range(b)]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0_hat = self.model(x, sigma)
        s = float(sigma.reshape(-1)[0])
        if s > self._last_sigma:
            self.runs.append(self.new_report(x0_hat))
        self._last_sigma = s
        report = self.runs[-1]
        radius = _schedule_value(self.radius, s, "radius")
        report.radius = max(report.radius, radius)
        report.radius_rms = report.radius / math.sqrt(report.elements)
        source = self.shield_source()
        result = None
        if radius > 0 and (source is not None or (self.intra_batch and x0_hat.shape[0] > 1)):
            lam = _schedule_value(self.overcompensation, s, "overcompensation")
            report.overcompensation = max(report.overcompensation, lam)
            result = sparse_repellency(x0_hat, radius, shields=source, intra_batch=self.intra_batch,
                                       overcompensation=lam, exact=self.exact)
        record, _ = step_record(len(report.steps), s, x0_hat, x, result)
        report.sigmas.append(s)
        report.steps.append(record)
        return x0_hat if result is None else result.denoised


def step_schedule(values: Sequence[float], sigmas: Sequence[float]) -> Callable[[float], float]:
    """Piecewise-constant schedule: ``values[i]`` while ``sigma >= sigmas[i]`` (sigmas decreasing), last value below."""
    if len(values) != len(sigmas) + 1:
        raise ValueError(f"step_schedule needs len(values) == len(sigmas) + 1, got {len(values)} and {len(sigmas)}")

    def fn(sigma: float) -> float:
        for v, s in zip(values, sigmas):
            if sigma >= s:
                return v
        return values[-1]
    return fn
