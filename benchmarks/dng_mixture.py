"""Gaussian mixtures with closed-form diffused densities, denoisers and posteriors, and small VE samplers.

Used by the DNG unit tests and by the statistical benchmark (``python -m benchmarks.dng_mixture``).
A mixture ``sum_k w_k N(m_k, s_k^2 I)`` diffused to noise level ``sigma`` (VE: ``x = x0 + sigma n``) is
``sum_k w_k N(m_k, (s_k^2 + sigma^2) I)``; its denoiser ``E[x0 | x]`` and the posterior of each component
are closed-form, so the DNG identities can be checked to float precision.

The benchmark samples the 1-D mixture of the paper's Fig. 1 setting (three modes, the middle one
forbidden) with euler_ancestral (eta = 1) and compares negative prompting (constant scale) with DNG using
the *tracked* posterior, sweeping the scale of each: forbidden-mode rate vs W1 distance to the target
(the mixture without the forbidden mode).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from guidance.dng import DngParams, PosteriorTracker, negative_guidance
from guidance.sampling import karras_sigmas, sample_euler_ancestral

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class GaussianMixture:
    """Isotropic Gaussian mixture: weights ``[K]``, means ``[K, d]``, stds ``[K]`` (float64)."""

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    @classmethod
    def make(cls, weights, means, stds) -> "GaussianMixture":
        w = torch.as_tensor(weights, dtype=torch.float64)
        m = torch.as_tensor(means, dtype=torch.float64)
        m = m.reshape(len(w), -1)
        return cls(w / w.sum(), m, torch.as_tensor(stds, dtype=torch.float64).reshape(-1))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _select(self, subset):
        idx = torch.arange(len(self.weights)) if subset is None else torch.as_tensor(subset)
        return self.weights[idx], self.means[idx], self.stds[idx]

    def log_joint(self, x, sigma, subset=None) -> torch.Tensor:
        """``log w_k + log N(x; m_k, (s_k^2 + sigma^2) I)`` per sample and component, ``[B, K]``."""
        w, m, s = self._select(subset)
        x = x.double().reshape(x.shape[0], -1)
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        var = s.reshape(1, -1) ** 2 + sig ** 2                     # [B or 1, K]
        sq = ((x[:, None, :] - m[None]) ** 2).sum(-1)               # [B, K]
        return torch.log(w)[None] - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def responsibilities(self, x, sigma, subset=None) -> torch.Tensor:
        return torch.softmax(self.log_joint(x, sigma, subset), dim=1)

    def posterior(self, x, sigma, component: int) -> torch.Tensor:
        """Exact ``p_sigma(c = component | x)``, ``[B]``."""
        return self.responsibilities(x, sigma)[:, component]

    def denoiser(self, x, sigma, subset=None) -> torch.Tensor:
        """Exact ``E[x0 | x_sigma]`` of the (sub-)mixture, shaped like ``x``."""
        w, m, s = self._select(subset)
        xf = x.double().reshape(x.shape[0], -1)
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        r = self.responsibilities(x, sigma, subset)                 # [B, K]
        shrink = (s.reshape(1, -1) ** 2 / (s.reshape(1, -1) ** 2 + sig ** 2))  # [B or 1, K]
        comp = m[None] + shrink[..., None] * (xf[:, None, :] - m[None])  # [B, K, d]
        return (r[..., None] * comp).sum(1).reshape(x.shape)

    def sample(self, n: int, gen: torch.Generator, subset=None) -> torch.Tensor:
        w, m, s = self._select(subset)
        k = torch.multinomial(w / w.sum(), n, replacement=True, generator=gen)
        return m[k] + s[k, None] * torch.randn(n, self.dim, generator=gen, dtype=torch.float64)


class DngDenoiser:
    """The guided denoiser of a mixture with one forbidden component: NP, DNG exact, or DNG tracked."""

    def __init__(self, mixture: GaussianMixture, forbidden: int, params: DngParams, posterior: str, batch: int):
        self.mix, self.forbidden, self.params, self.posterior_kind = mixture, forbidden, params, posterior
        self.tracker = PosteriorTracker(params, batch)
        self.log = []  # (sigma, tracked p, exact p) per call

    def __call__(self, x, sigma):
        d_base = self.mix.denoiser(x, sigma)
        d_neg = self.mix.denoiser(x, sigma, subset=[self.forbidden])
        tracked = self.tracker.observe(x, sigma, d_base, d_neg)
        exact = self.mix.posterior(x, sigma, self.forbidden)
        self.log.append((float(sigma.reshape(-1)[0]), tracked.clone(), exact.clone()))
        p = exact.clamp(max=1 - 1e-12) if self.posterior_kind == "exact" else tracked
        return negative_guidance(d_base, d_neg, self.params.scale(p))


def forbidden_rate(mix: GaussianMixture, samples, forbidden: int) -> float:
    """Fraction of samples whose most likely component (at sigma = 0) is the forbidden one."""
    return float((mix.responsibilities(samples, 0.0).argmax(1) == forbidden).double().mean())


def w1_1d(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """W1 between two 1-D empirical distributions of equal size (mean |sorted difference|)."""
    a, _ = samples.reshape(-1).sort()
    b, _ = reference.reshape(-1).sort()
    return float((a - b).abs().mean())


def run_setting(mix, forbidden, params, posterior, n, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    sigmas = karras_sigmas(steps, sigma_min=0.002, sigma_max=20.0)
    x = torch.randn(n, mix.dim, generator=gen, dtype=torch.float64) * sigmas[0]
    den = DngDenoiser(mix, forbidden, params, posterior, n)
    out = sample_euler_ancestral(den, x, sigmas, generator=gen)
    return out, den


def tracking_error(log) -> tuple[float, float]:
    """Mean and 95th-percentile |p_tracked - p_exact| over all calls and samples of a run."""
    errs = torch.cat([(t - e).abs() for _, t, e in log])
    return float(errs.mean()), float(errs.quantile(0.95))


PAPER_MIX = dict(weights=[0.35, 0.3, 0.35], means=[-3.0, 0.0, 3.0], stds=[0.6, 0.6, 0.6])
FORBIDDEN = 1


def main():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, steps, seed = 20000, 100, 0
    mix = GaussianMixture.make(**PAPER_MIX)
    gen = torch.Generator().manual_seed(123)
    target = mix.sample(n, gen, subset=[0, 2])
    t0 = time.time()
    rows = []
    np_scales = [0.5, 1, 1.25, 1.5, 2, 4, 8, 16]
    dng_scales = [1, 2, 3, 4, 8, 16, 32, 64]
    base_params = dict(prior=float(mix.weights[FORBIDDEN]), tau=1.0, delta=0.0, p_min=1e-6, p_max=0.999)
    for lam in np_scales:
        out, _ = run_setting(mix, FORBIDDEN, DngParams(lam0=lam, mode="constant", **base_params), "tracked", n, steps, seed)
        rows.append(("NP", lam, forbidden_rate(mix, out, FORBIDDEN), w1_1d(out, target), None, out))
    for lam in dng_scales:
        out, den = run_setting(mix, FORBIDDEN, DngParams(lam0=lam, **base_params), "tracked", n, steps, seed)
        rows.append(("DNG", lam, forbidden_rate(mix, out, FORBIDDEN), w1_1d(out, target), tracking_error(den.log), out))
    exact, den_exact = run_setting(mix, FORBIDDEN, DngParams(lam0=1.0, **base_params), "exact", n, steps, seed)
    rows.append(("DNG exact posterior", 1.0, forbidden_rate(mix, exact, FORBIDDEN), w1_1d(exact, target), None, exact))
    unguided, _ = run_setting(mix, FORBIDDEN, DngParams(lam0=0.0, mode="constant", **base_params), "tracked", n, steps, seed)
    rows.append(("unguided", 0.0, forbidden_rate(mix, unguided, FORBIDDEN), w1_1d(unguided, target), None, unguided))
    elapsed = time.time() - t0

    print(f"1-D mixture {PAPER_MIX}, forbidden mode {FORBIDDEN}; euler_ancestral, {steps} Karras steps, n={n}, seed={seed}")
    print(f"DNG tracker: tau=1, delta=0, prior={base_params['prior']:.2f}, p_max={base_params['p_max']}")
    print("| method | scale | forbidden rate | W1 to target | tracking error mean / p95 |")
    print("|---|---|---|---|---|")
    for name, lam, fr, w1, terr, _ in rows:
        te = f"{terr[0]:.4f} / {terr[1]:.4f}" if terr else ""
        print(f"| {name} | {lam:g} | {fr * 100:.2f}% | {w1:.4f} | {te} |")
    safe_np = [r for r in rows if r[0] == "NP" and r[2] <= 0.01]
    safe_dng = [r for r in rows if r[0] == "DNG" and r[2] <= 0.01]
    if safe_np and safe_dng:
        best_np = min(safe_np, key=lambda r: r[3])
        best_dng = min(safe_dng, key=lambda r: r[3])
        print(f"at <= 1% forbidden: best NP W1 {best_np[3]:.4f} (scale {best_np[1]:g}), best DNG W1 {best_dng[3]:.4f} "
              f"(lam0 {best_dng[1]:g}); ratio DNG/NP = {best_dng[3] / best_np[3]:.3f}")
    else:
        print(f"no setting reached <= 1% forbidden: NP {bool(safe_np)}, DNG {bool(safe_dng)}")
    print(f"elapsed {elapsed:.1f} s")

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, marker in (("NP", "o"), ("DNG", "s")):
        pts = [(r[2] * 100, r[3], r[1]) for r in rows if r[0] == name]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=name)
        for fr, w1, lam in pts:
            axes[0].annotate(f"{lam:g}", (fr, w1), fontsize=7)
    axes[0].axvline(1.0, color="grey", ls=":")
    axes[0].set_xscale("symlog", linthresh=0.1)
    axes[0].set_xlim(left=0.0)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("forbidden-mode rate (%)")
    axes[0].set_ylabel("W1 to target")
    axes[0].set_title("scale sweep (labels: scale)")
    axes[0].legend()
    grid = torch.linspace(-14, 14, 141).numpy()

    def hist(values, **kw):  # fraction of *all* samples per bin (samples outside the range are not renormalised)
        v = values.reshape(-1).clamp(-14, 14).numpy()
        axes[1].hist(v, bins=grid, weights=[1.0 / len(v)] * len(v), **kw)
    hist(target, histtype="step", color="k", label="target")
    if safe_np:
        hist(best_np[5], alpha=0.5, label=f"NP scale {best_np[1]:g}")
    if safe_dng:
        hist(best_dng[5], alpha=0.5, label=f"DNG lam0 {best_dng[1]:g}")
    axes[1].set_ylabel("fraction of samples per bin (edges collect |x| > 14)")
    axes[1].set_title("samples at <= 1% forbidden")
    axes[1].legend(fontsize=8)
    _, den = run_setting(mix, FORBIDDEN, DngParams(lam0=best_dng[1] if safe_dng else 8.0, **base_params), "tracked", 8, steps, 7)
    sig = [s for s, _, _ in den.log]
    for j in range(8):
        line, = axes[2].plot(sig, [float(t[j]) for _, t, _ in den.log], lw=1)
        axes[2].plot(sig, [float(e[j]) for _, _, e in den.log], lw=1, ls="--", color=line.get_color())
    axes[2].set_xscale("log")
    axes[2].invert_xaxis()
    axes[2].set_xlabel("sigma")
    axes[2].set_ylabel("p(c- | x_t)")
    axes[2].set_title("tracked (solid) vs exact (dashed) posterior")
    fig.tight_layout()
    path = RESULTS / "dng_mixture.png"
    fig.savefig(path, dpi=110)
    print(f"plot: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
