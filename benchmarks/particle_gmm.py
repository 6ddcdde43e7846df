"""Particle guidance vs EDDY on a 2-D Gaussian mixture with closed-form scores.

    /work/venv/bin/python benchmarks/particle_gmm.py [--batches 300] [--steps 40]

Exact denoiser of a 4-component 2-D mixture (weights 0.4/0.3/0.2/0.1, std 0.35): ``D(x, s) = x + s^2 grad log
p_s(x)``. Batches of N = 8 particles start from the exact noised law ``x_T = x0 + sigma_max z`` (so the start
is exactly the product density EDDY is built on) and follow the probability-flow ODE with Heun steps
(``guidance.sampling.sample_heun``, Karras sigmas 20 -> 0.005). Guidance is a denoiser wrapper:
PG ``D' = D + strength * sigma * sum_j k_ij (D_i - D_j) / sqrt(h)`` (latent space, median bandwidth), EDDY
``D' = D + sigma * strength * v`` with ``v = eddy_drift(x, s)`` (exact divergence), both for sigma in
[0.2, 20] (below that EDDY's explicit steps become unstable at strength >= 2). Every method uses the same
starting noise. Reported per strength: mean pairwise distance inside a batch (relative to unguided), sliced
W1 of all samples to 20 000 exact mixture samples, and an energy-distance permutation test against the
unguided samples. Writes ``benchmarks/results/particle_gmm.png``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark script: run from a checkout

from guidance.eddy import eddy_drift  # noqa: E402
from guidance.particle import particle_guidance  # noqa: E402
from guidance.sampling import karras_sigmas, sample_heun  # noqa: E402

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5], [0.5, -2.5]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
STD = 0.35
N = 8
SIGMA_MAX, SIGMA_MIN = 20.0, 0.005
PG_STRENGTHS = [0.05, 0.1, 0.2, 0.4]
EDDY_STRENGTHS = [0.25, 0.5, 1.0, 1.5]   # 2.0 diverges with 30-40 Heun steps (see BENCHMARKS.md)
WINDOW = (0.2, SIGMA_MAX)        # guidance active for sigma in this range (both methods)


def gmm_sample(n: int, gen: torch.Generator) -> torch.Tensor:
    comp = torch.multinomial(WEIGHTS, n, replacement=True, generator=gen)
    return MEANS[comp] + STD * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def gmm_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact ``E[x0 | x]`` of the mixture at noise ``sigma`` (posterior-weighted component means)."""
    s2 = float(sigma.flatten()[0]) ** 2
    var = STD ** 2 + s2
    logits = torch.log(WEIGHTS) - (x[:, None, :] - MEANS).square().sum(-1) / (2 * var)
    resp = torch.softmax(logits, -1)                                   # [B, K]
    comp_mean = (STD ** 2 * x[:, None, :] + s2 * MEANS) / var           # E[x0 | x, k]
    return (resp[..., None] * comp_mean).sum(1)


class Guided:
    """Denoiser wrapper applying PG or EDDY independently inside every batch of N particles."""

    def __init__(self, mode: str, strength: float):
        self.mode, self.strength = mode, strength

    def __call__(self, x, sigma):
        d = gmm_denoiser(x, sigma)
        s = float(sigma.flatten()[0])
        if self.mode == "none" or self.strength == 0 or not WINDOW[0] <= s <= WINDOW[1]:
            return d
        xb, db = x.reshape(-1, N, 2), d.reshape(-1, N, 2)
        out = torch.empty_like(db)
        for b in range(xb.shape[0]):
            if self.mode == "pg":
                out[b] = db[b] + particle_guidance(db[b], self.strength, sigma=s).delta.double()
            else:
                score = (db[b] - xb[b]) / s ** 2
                out[b] = db[b] + s * self.strength * eddy_drift(xb[b], score)
        return out.reshape(x.shape)


def mean_pairwise(samples: torch.Tensor) -> float:
    b = samples.reshape(-1, N, 2)
    return float(torch.cdist(b, b).sum((1, 2)).mean() / (N * (N - 1)))


def paired_growth(out: torch.Tensor, base: torch.Tensor):
    """Mean and standard error over batches of (spread / unguided spread of the same starting noise) - 1."""
    def per_batch(x):
        b = x.reshape(-1, N, 2)
        return torch.cdist(b, b).sum((1, 2)) / (N * (N - 1))
    r = per_batch(out) / per_batch(base) - 1
    return float(r.mean()), float(r.std() / math.sqrt(len(r)))


def sliced_w1(a: torch.Tensor, b: torch.Tensor, projections: int = 256) -> float:
    gen = torch.Generator().manual_seed(123)
    theta = torch.rand(projections, generator=gen, dtype=torch.float64) * math.pi
    dirs = torch.stack([theta.cos(), theta.sin()], 1)
    qs = torch.linspace(0.0005, 0.9995, 2000, dtype=torch.float64)
    pa = torch.quantile(a @ dirs.t(), qs, dim=0)
    pb = torch.quantile(b @ dirs.t(), qs, dim=0)
    return float((pa - pb).abs().mean())


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def energy_test(a: torch.Tensor, b: torch.Tensor, permutations: int = 100) -> float:
    """Permutation p-value of the energy distance between samples ``a`` and ``b``."""
    gen = torch.Generator().manual_seed(7)
    stat = energy_distance(a, b)
    pooled = torch.cat([a, b])
    hits = 0
    for _ in range(permutations):
        idx = torch.randperm(len(pooled), generator=gen)
        hits += energy_distance(pooled[idx[:len(a)]], pooled[idx[len(a):]]) >= stat
    return (hits + 1) / (permutations + 1)


def run(mode, strength, x0_noise, sigmas):
    t = time.perf_counter()
    out = sample_heun(Guided(mode, strength), x0_noise.clone(), sigmas)
    return out, time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    reference = gmm_sample(20000, gen)
    start = gmm_sample(args.batches * N, gen) + SIGMA_MAX * torch.randn(args.batches * N, 2, generator=gen,
                                                                         dtype=torch.float64)
    floor = [sliced_w1(gmm_sample(args.batches * N, gen), reference) for _ in range(5)]
    sigmas = karras_sigmas(args.steps, SIGMA_MIN, SIGMA_MAX).double()
    base, _ = run("none", 0.0, start, sigmas)
    base_spread, base_w1 = mean_pairwise(base), sliced_w1(base, reference)
    rows = [("unguided", 0.0, base_spread, 0.0, base_w1, float("nan"), base, 0.0, 0.0)]
    for mode, strengths in (("pg", PG_STRENGTHS), ("eddy", EDDY_STRENGTHS)):
        for strength in strengths:
            out, secs = run(mode, strength, start, sigmas)
            spread = mean_pairwise(out)
            pm, pse = paired_growth(out, base)
            rows.append((mode, strength, spread, spread / base_spread - 1, sliced_w1(out, reference),
                         energy_test(out, base), out, pm, pse))
            print(f"  {mode} {strength}: {secs:.1f} s", file=sys.stderr)
    print(f"2-D GMM, {args.batches} batches x {N} particles, Heun {args.steps} steps, sigma {SIGMA_MAX}->{SIGMA_MIN}")
    print(f"sliced-W1 noise floor (exact samples of the same size vs reference): "
          f"{np.mean(floor):.4f} +- {np.std(floor):.4f}")
    print("| method | strength | mean pairwise dist | vs unguided | per-batch change (mean +- s.e.) "
          "| sliced W1 to exact | energy test p vs unguided |")
    print("|---|---|---|---|---|---|---|")
    for mode, strength, spread, growth, w1, p, _, pm, pse in rows:
        print(f"| {mode} | {strength:g} | {spread:.3f} | {growth:+.1%} | {pm:+.1%} +- {pse:.1%} | {w1:.4f} | {p:.3f} |")
    plot(rows, reference, Path(ROOT / "benchmarks" / "results" / "particle_gmm.png"))


def plot(rows, reference, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    picks = [rows[0], max((r for r in rows if r[0] == "pg"), key=lambda r: r[1]),
             max((r for r in rows if r[0] == "eddy"), key=lambda r: r[1])]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    for ax, (mode, strength, spread, growth, w1, p, out, *_) in zip(axes, picks):
        ax.scatter(reference[:3000, 0], reference[:3000, 1], s=2, c="0.8", label="exact")
        ax.scatter(out[:, 0], out[:, 1], s=2, c="C0" if mode == "unguided" else ("C3" if mode == "pg" else "C2"))
        ax.scatter(out[:N, 0], out[:N, 1], s=40, marker="x", c="k", label="one batch")
        ax.set_title(f"{mode} {strength:g}: spread {growth:+.0%}, W1 {w1:.3f}")
        ax.set_xlim(-4, 4), ax.set_ylim(-4, 4), ax.set_aspect("equal")
    ax = axes[3]
    for mode, colour in (("pg", "C3"), ("eddy", "C2")):
        rs = [r for r in rows if r[0] == mode]
        ax.plot([r[3] * 100 for r in rs], [r[4] for r in rs], "o-", c=colour, label=mode)
    ax.axhline(rows[0][4], c="C0", ls="--", label="unguided")
    ax.set_xlabel("mean pairwise distance vs unguided (%)"), ax.set_ylabel("sliced W1 to exact mixture")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
