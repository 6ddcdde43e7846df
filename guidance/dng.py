"""DNG: dynamic negative guidance, a negative prompt whose scale follows the posterior of the concept.

Koulischer, Deleu, Raya, Demeester, Ambrogioni, "Dynamic Negative Guidance of Diffusion Models",
ICLR 2025, arXiv:2410.14398.

Sources. The paper text shipped with the project was empty, so this module follows (a) the project's
DIGEST.md section 2 (guided prediction, scale, posterior update, hyper-parameter ranges) and (b) the
authors' public code (github.com/FelixKoulischer/Dynamic-Negative-Guidance, ``gen_batch_DNG`` and
``compute_posterior_DNG`` in ``utils/Generate_Batch_pretrained.py``, read but not copied) for Algorithm 1-2
details: the posterior is a per-sample multiplicative state started at the prior, updated after every step
from the state actually reached, with the DDPM posterior variance ``beta_tilde_t`` in the denominator, the
offset added *inside* the bracket (``exp((-tau * diff + delta) / (2 sigma_t^2))``), then clamped to
``[p_min, p_max]``; the scale of a step uses the posterior as it stands when the step starts (staggered:
the predictions of the current step only enter the posterior at the next step). We keep the state in
log space (``log p``, clamped in log space), which is the same recursion without over/underflow.

Guided prediction (negative prompting with a dynamic scale; linear, so it holds for eps or denoised)::

    D_guided = D_base - lam_t * (D_neg - D_base),     lam_t = lam0 * p / (1 - p),   p = p_t(c- | x_t)

Negative prompting (NP) is the same with ``lam_t = lam0`` constant.  With the *exact* posterior and
``lam0 = 1`` this is exactly the denoiser of the data distribution with the concept removed::

    grad log p(x | not c-) = s - P / (1 - P) * (s_c - s),   D = x + sigma^2 s   (Appendix B, Fig. 1)

Posterior recursion (Algorithm 2).  Because ``c- -> x_0 -> x_{t'} -> x_t`` is a Markov chain of the forward
process, Bayes' rule on one reverse transition is exact:
``p(c-|x_{t'}) = p(c-|x_t) p(x_{t'}|x_t, c-) / p(x_{t'}|x_t)``.  Approximating both reverse transitions by
Gaussians of a common variance ``s^2`` and means ``mu_neg``, ``mu_base`` predicted from the two models gives::

    log p <- log p + ( -tau * (||x' - mu_neg||^2 - ||x' - mu_base||^2) + delta ) / (2 s^2),   then clamp

(``tau = 1, delta = 0`` is the Bayes update; the paper tempers it with ``tau`` and biases it with ``delta``.)

Mapping to ComfyUI's k-diffusion samplers (derivation).  ComfyUI samples in "VE" coordinates
``x = x0 + sigma * n`` for eps/v models and calls the model with ``(x_i, sigma_i)`` once per step for the
samplers that matter here.  The DDPM reverse step of the paper in VP coordinates,
``x_vp = sqrt(abar) x0 + sqrt(1 - abar) n``, with ``sigma^2 = (1 - abar) / abar`` and ``x = x_vp / sqrt(abar)``,
is the Gaussian posterior ``q(x_{t-1} | x_t, x0 = D)``.  Rewritten in VE coordinates between
``sigma = sigma_i`` and ``sigma' = sigma_{i+1}`` (``beta_t = (sigma^2 - sigma'^2) / (1 + sigma^2)``,
``1 - abar_t = sigma^2 / (1 + sigma^2)``, ``abar_{t-1} = 1 / (1 + sigma'^2)``):

* predicted next-state means:  ``mu_c = D_c + (sigma'^2 / sigma^2) (x_i - D_c)``  for ``c`` in {base, neg}
  (``ddpm_step_mean``; identical to the paper's ``(x - beta / sqrt(1 - abar) eps) / sqrt(alpha)`` after the
  change of coordinates);
* transition variance: ``s^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2`` (``ddpm_step_variance``), which is
  ``beta_tilde_t / abar_{t-1}``: the paper's ``sigma_t^2`` in VE units.  It is also *exactly* the variance of
  the noise the stochastic samplers inject at their default ``eta = 1``: euler_ancestral / dpm_2_ancestral
  (``sigma_up^2``) and dpmpp_2m_sde / dpmpp_3m_sde (``sigma'^2 (1 - e^{-2h})`` with ``h = log(sigma/sigma')``).
  For deterministic samplers (euler, heun, dpmpp_2m, uni_pc, ddim...) no noise is injected; we use the same
  value as a documented *nominal* DDPM variance: the tracker then reads the deterministic move of the state
  relative to the two predicted means as evidence, the ``r (x_i - D_c)`` part of ``x' - mu_c`` standing in
  for the noise.
* state reached: the ``x`` of the next model call, ``x_{i+1}``.  The update for step ``i`` therefore runs
  at the start of call ``i + 1``, before the scale of that call is computed (the paper's order).  The last
  step's outcome is never observed; it affects nothing that is sampled.
* The squared-distance difference and ``s^2`` are in the same units, so the Bayes term is invariant under
  the rescaling VE <-> VP; the offset is not: the paper adds ``delta`` to a VP squared distance, so we
  divide it by the VP variance ``s^2 / (1 + sigma'^2)`` (``log_posterior_increment``), which reproduces the
  paper's numbers on a 1000-step DDPM exactly (tested).
* Models whose sampler state is a scaled VE state (flow/"CONST" models: ``x = (1 - s) x0 + s n``) pass the
  signal scale ``alpha`` (``x = alpha * (x0 + sigma_ve n)``); the tracker works with ``x / alpha`` and
  ``sigma / alpha``.
* The flow endpoint ``s = 1`` (SD3, Flux, WAN start there) has ``alpha = 0``: ``sigma_ve = inf`` and ``x / alpha``
  is undefined, but the transition out of it is not.  In the paper's DDPM terms it is zero terminal SNR,
  ``abar_T = 0``, so ``beta_T = 1``: Eq. (2)'s eps form divides by ``sqrt(1 - beta_T) = 0``, while the posterior
  ``q(x_{T-1} | x_T, x0)`` has mean ``sqrt(abar_{T-1}) x0 + 0 * x_T`` and variance ``1 - abar_{T-1}``: the state
  at pure noise carries no information, and the transition is the forward marginal ``q(x_{T-1} | x0)``.  In VE
  units this is the ``sigma -> inf`` limit of the two formulas above, written so that it is exact there:
  ``mu_c = D_c`` (``sigma'^2 / sigma^2 = 0``) and ``s^2 = sigma'^2 (1 - sigma'^2 / sigma^2) = sigma'^2``.  The
  tracker stores ``sigma_ve = inf`` (and a state that is multiplied by that zero), so the first transition's
  evidence ``-tau (||x' - D_neg||^2 - ||x' - D_base||^2) / (2 sigma'^2)`` is counted like every other one.
* A call whose sigma is not below the previous one (second stage of heun/dpmpp_sde at a repeated sigma, a
  restart) updates nothing and only becomes the new reference; multi-stage samplers thus treat every model
  call as one transition.
* Discretisation: the Bayes term is consistent across step counts (it is a discretised likelihood ratio);
  the offset is per *transition*, so ``delta`` tuned for 1000 DDPM steps acts much more weakly at 20-30
  steps (its total grows with the number of steps).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

MODES = ("dynamic", "constant")


def dng_scale(p: torch.Tensor, lam0: float) -> torch.Tensor:
    """Dynamic scale ``lam_t = lam0 * p / (1 - p)`` (DNG, Sec. 3)."""
    return lam0 * p / (1.0 - p)


def negative_guidance(base: torch.Tensor, neg: torch.Tensor, lam) -> torch.Tensor:
    """Negative guidance ``base - lam * (neg - base)``; ``lam`` is a float or a per-sample ``[B]`` tensor."""
    if isinstance(lam, torch.Tensor):
        lam = lam.to(device=base.device, dtype=base.dtype).reshape((-1,) + (1,) * (base.dim() - 1))
    return base - lam * (neg - base)


def add_negative_guidance(denoised: torch.Tensor, base: torch.Tensor, neg: torch.Tensor, lam) -> torch.Tensor:
    """``denoised - lam (D_neg - D_base)``: the DNG term on top of a CFG-combined prediction (T2I form, base = positive)."""
    if isinstance(lam, torch.Tensor):
        lam = lam.to(device=denoised.device, dtype=denoised.dtype).reshape((-1,) + (1,) * (denoised.dim() - 1))
    return denoised - lam * (neg - base)


def negative_prompting(base: torch.Tensor, neg: torch.Tensor, lam: float) -> torch.Tensor:
    """Negative-prompting baseline: constant scale ``eps = eps_base - lam (eps_neg - eps_base)``."""
    return negative_guidance(base, neg, float(lam))


def cpu64(value) -> torch.Tensor:
    """A tensor or number as a float64 tensor on the CPU (a number converted directly, not through float32)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64)
    return torch.as_tensor(value, dtype=torch.float64)


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or ``[B]`` value as a ``[B, 1, ...]`` float64 tensor broadcastable against ``like``."""
    t = torch.as_tensor(value, dtype=torch.float64, device=like.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(like.shape[0])
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def ddpm_step_mean(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Mean of ``q(x' | x, x0 = D)`` in VE units: ``D + (sigma'^2 / sigma^2) (x - D)`` (DDPM posterior mean);
    exactly ``D`` from ``sigma = inf`` (the flow endpoint, whatever ``x`` holds there)."""
    r2 = (_per_sample(sigma_next, x) / _per_sample(sigma, x)) ** 2
    d = denoised.double()
    return torch.where(r2 > 0, d + r2 * (x.double() - d), d)


def ddpm_step_variance(sigma, sigma_next) -> torch.Tensor:
    """Variance of ``q(x' | x, x0)`` in VE units: ``sigma'^2 (1 - sigma'^2 / sigma^2)`` (= beta_tilde / abar');
    ``sigma'^2`` from ``sigma = inf``."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    sn = torch.as_tensor(sigma_next, dtype=torch.float64)
    return sn ** 2 * (1.0 - (sn / s) ** 2)


def ve_state(x: torch.Tensor, sigma, alpha):
    """``(x / alpha, sigma / alpha)`` per sample for ``x = alpha (x0 + sigma_ve n)``; at ``alpha = 0`` (the flow
    endpoint) ``(0, inf)``: the transition out of it does not depend on the state (``ddpm_step_mean``)."""
    a = _per_sample(alpha, x)
    x_ve = torch.where(a > 0, x.double() / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(a))
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
    a = a.reshape(-1)
    sigma_ve = torch.where(a > 0, s / torch.where(a > 0, a, torch.ones_like(a)), torch.full_like(s, math.inf))
    return x_ve, sigma_ve


def log_posterior_increment(x_next, mu_neg, mu_base, variance, tau: float, delta: float, sigma_next) -> torch.Tensor:
    """Algorithm 2 increment ``(-tau (||x'-mu_neg||^2 - ||x'-mu_base||^2)) / (2 s^2) + delta / (2 s_vp^2)``, per sample."""
    xn = x_next.double()
    # ||x'-mu_n||^2 - ||x'-mu_b||^2 = <mu_b - mu_n, 2x' - mu_n - mu_b>: no cancellation of two large norms.
    diff = ((mu_base - mu_neg) * (2.0 * xn - mu_neg - mu_base)).flatten(1).sum(dim=1)
    var = torch.as_tensor(variance, dtype=torch.float64, device=xn.device).reshape(-1)
    var_vp = var / (1.0 + torch.as_tensor(sigma_next, dtype=torch.float64, device=xn.device).reshape(-1) ** 2)
    return -tau * diff / (2.0 * var) + delta / (2.0 * var_vp)


def clamp_log_posterior(log_p: torch.Tensor, p_min: float, p_max: float) -> torch.Tensor:
    """``p = clamp(p, p_min, p_max)`` in log space (Algorithm 1, last line)."""
    return log_p.clamp(math.log(p_min), math.log(p_max))


@dataclass(frozen=True)
class DngParams:
    """Hyper-parameters of DNG: scale ``lam0``, prior ``p(c-)``, temperature ``tau``, offset ``delta``, clamps, mode."""

    lam0: float = 5.0
    prior: float = 0.01
    tau: float = 0.2
    delta: float = 0.002
    p_min: float = 1e-6
    p_max: float = 0.9
    mode: str = "dynamic"

    def __post_init__(self):
        validate_params(self)

    def scale(self, p: torch.Tensor) -> torch.Tensor:
        """Per-sample scale: ``lam0 p / (1 - p)`` (dynamic) or ``lam0`` (constant = negative prompting)."""
        if self.mode == "constant":
            return torch.full_like(p, self.lam0)
        return dng_scale(p, self.lam0)


def validate_params(params: DngParams) -> None:
    """Raise ``ValueError`` naming the offending hyper-parameter (the node's input, with the paper's symbol)."""
    if not 0.0 < params.prior < 1.0:
        raise ValueError(f"input 'prior' must lie strictly between 0 and 1 (it is the initial posterior p(c-)), "
                         f"got {params.prior}; the paper uses 0.01")
    if not 0.0 < params.p_min < params.p_max < 1.0:
        raise ValueError(f"inputs 'p_min'/'p_max' need 0 < p_min < p_max < 1, got p_min={params.p_min}, "
                         f"p_max={params.p_max}; e.g. p_min=1e-6, p_max=0.9")
    if params.mode not in MODES:
        raise ValueError(f"input 'mode' must be one of {MODES}, got {params.mode!r}")
    for name, symbol in (("scale", "lam0"), ("temperature", "tau"), ("offset", "delta")):
        value = getattr(params, symbol)
        if not math.isfinite(value) or (symbol != "delta" and value < 0):
            kind = "a finite number" if symbol == "delta" else "a finite non-negative number"
            raise ValueError(f"input '{name}' ({symbol}) must be {kind}, got {value}")


class PosteriorTracker:
    """Per-sample log-posterior ``log p(c- | x_t)`` tracked along one sampling run (Algorithm 2, staggered)."""

    def __init__(self, params: DngParams, batch: int):
        self.params = params
        lo, hi = math.log(params.p_min), math.log(params.p_max)
        start = min(max(math.log(params.prior), lo), hi)
        self.log_p = torch.full((batch,), start, dtype=torch.float64)
        self._prev = None  # (x_ve, sigma_ve [B], mu-ready denoised base, denoised neg) of the previous call

    @property
    def posterior(self) -> torch.Tensor:
        return self.log_p.exp()

    def observe(self, x, sigma, denoised_base, denoised_neg, alpha=1.0) -> torch.Tensor:
        """Fold the transition that led to ``x`` into the posterior, remember this call; returns ``p [B]`` (float64,
        CPU) for this step. The tracker's float64 state lives on the CPU whatever the sampling device (MPS has no
        float64): each call copies the state and both predictions there."""
        x, denoised_base, denoised_neg, sigma, alpha = map(cpu64, (x, denoised_base, denoised_neg, sigma, alpha))
        x_ve, sigma_ve = ve_state(x, sigma, alpha)
        if self._prev is not None:
            self._update(x_ve, sigma_ve)
        self._prev = (x_ve, sigma_ve.clone(), denoised_base, denoised_neg)
        return self.posterior

    def _update(self, x_next, sigma_next):
        x, sigma, d_base, d_neg = self._prev
        if x.shape != x_next.shape:
            return
        moved = sigma_next < sigma * (1.0 - 1e-6)
        if not bool(moved.any()):
            return
        mu_neg = ddpm_step_mean(x, d_neg, sigma, sigma_next)
        mu_base = ddpm_step_mean(x, d_base, sigma, sigma_next)
        var = ddpm_step_variance(sigma, sigma_next).to(x.device)
        safe_var = torch.where(moved & (var > 0), var, torch.ones_like(var))
        inc = log_posterior_increment(x_next, mu_neg, mu_base, safe_var, self.params.tau, self.params.delta, sigma_next)
        inc = torch.where(moved & (var > 0), inc, torch.zeros_like(inc))
        self.log_p = clamp_log_posterior(self.log_p + inc, self.params.p_min, self.params.p_max)


@dataclass
class DngTrace:
    """Per-step, per-sample record of one DNG run (the latest run of the node that owns it)."""

    sigmas: list = field(default_factory=list)      # [steps] sigma of each model call
    posterior: list = field(default_factory=list)   # [steps][batch] p(c- | x_t) used at that call
    scale: list = field(default_factory=list)       # [steps][batch] scale applied (0 outside start/end)
    lam0: float = 0.0
    p_min: float = 0.0
    p_max: float = 0.0
    prior: float = 0.0
    mode: str = "dynamic"
    tau: float = 0.0
    delta: float = 0.0
    runs: int = 0                                   # sampling runs seen by the owner (the trace shows the last)

    @classmethod
    def for_params(cls, params: DngParams) -> "DngTrace":
        return cls(lam0=params.lam0, p_min=params.p_min, p_max=params.p_max, prior=params.prior,
                   mode=params.mode, tau=params.tau, delta=params.delta)

    def start_run(self) -> None:
        self.sigmas, self.posterior, self.scale = [], [], []
        self.runs += 1

    def record(self, sigma: float, posterior: torch.Tensor, scale: torch.Tensor) -> None:
        self.sigmas.append(float(sigma))
        self.posterior.append([float(v) for v in posterior.reshape(-1).tolist()])
        self.scale.append([float(v) for v in scale.reshape(-1).tolist()])

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if not self.sigmas:
            return f"DNG ({self.mode}, lam0={self.lam0}): no sampling run recorded yet"
        peak = max(max(row) for row in self.scale)
        final = self.posterior[-1]
        active = sum(1 for row in self.scale if any(v > 0 for v in row))
        return (f"DNG ({self.mode}, lam0={self.lam0}, prior={self.prior}, tau={self.tau}, delta={self.delta}): "
                f"run {self.runs}, {len(self.sigmas)} steps x {len(final)} samples, guidance active on {active} steps, "
                f"peak scale {peak:.4g}, final posterior min/max {min(final):.3g}/{max(final):.3g}")
