"""Particle guidance vs EDDY vs start coupling on a 2-D Gaussian mixture with closed-form scores, batch N = 2, 4, 8.

    /work/venv/bin/python benchmarks/particle_gmm.py [--particles 1600] [--steps 40]

Exact denoiser of a 4-component 2-D mixture (weights 0.4/0.3/0.2/0.1, std 0.35): ``D(x, s) = x + s^2 grad log
p_s(x)``. For each batch size N the same ``--particles`` starting points (``particles / N`` batches) start from
the exact noised law ``x_T = x0 + sigma_max z`` (so the start is exactly the product density EDDY is built on)
and follow the probability-flow ODE with Heun steps (``guidance.sampling.sample_heun``, Karras sigmas
20 -> 0.005). Methods:

- PG: ``D' = D + strength * sigma * sum_j k_ij (D_i - D_j) / sqrt(h)`` (latent space, median bandwidth);
- EDDY: ``D' = D + sigma * strength * v`` with ``v = eddy_drift(x, s)`` (exact divergence);
  both for sigma in [0.2, 20] (below that EDDY's explicit steps become unstable at strength >= 2);
- coupled start: ``z`` replaced by the exact-marginal coupling ``guidance.coupling.coupled_coordinates`` (in 2-D
  the whole space is the coupled subspace: ``z_i' = ||z_i|| Q d_i``, ``d`` the regular simplex/polygon), then
  the unguided ODE.

Every method uses the same ``x0`` and radii. Reported per N and method: change of the mean pairwise distance and
of the mean SQUARED pairwise distance inside a batch (vs unguided, paired standard error), the bound
``N / (N - 1)`` on the squared one for any exact-marginal method, sliced W1 of all samples to 20 000 exact
mixture samples (noise floor: exact samples of the same size), and an energy-distance permutation test against
the unguided samples. Writes ``benchmarks/results/particle_gmm.png``.
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

from guidance.coupling import coupled_coordinates  # noqa: E402
from guidance.eddy import eddy_drift  # noqa: E402
from guidance.particle import particle_guidance  # noqa: E402
from guidance.sampling import karras_sigmas, sample_heun  # noqa: E402

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5], [0.5, -2.5]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
STD = 0.35
BATCH_SIZES = (2, 4, 8)
SIGMA_MAX, SIGMA_MIN = 20.0, 0.005
PG_STRENGTHS = [0.05, 0.1, 0.2]
EDDY_STRENGTHS = [0.5, 1.0]      # 2.0 diverges with 30-40 Heun steps (see BENCHMARKS.md)
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
    """Denoiser wrapper applying PG or EDDY independently inside every batch of ``n`` particles."""

    def __init__(self, mode: str, strength: float, n: int):
        self.mode, self.strength, self.n = mode, strength, n

    def __call__(self, x, sigma):
        d = gmm_denoiser(x, sigma)
        s = float(sigma.flatten()[0])
        if self.mode == "none" or self.strength == 0 or not WINDOW[0] <= s <= WINDOW[1]:
            return d
        xb, db = x.reshape(-1, self.n, 2), d.reshape(-1, self.n, 2)
        out = torch.empty_like(db)
        for b in range(xb.shape[0]):
            if self.mode == "pg":
                out[b] = db[b] + particle_guidance(db[b], self.strength, sigma=s).delta.double()
            else:
                score = (db[b] - xb[b]) / s ** 2
                out[b] = db[b] + s * self.strength * eddy_drift(xb[b], score)
        return out.reshape(x.shape)


def batch_spreads(samples: torch.Tensor, n: int):
    """Per batch: mean pairwise distance and mean squared pairwise distance over ordered pairs, ``[B]`` each."""
    b = samples.reshape(-1, n, 2)
    dist = torch.cdist(b, b)
    return dist.sum((1, 2)) / (n * (n - 1)), dist.square().sum((1, 2)) / (n * (n - 1))


def paired_change(out: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """``mean(out) / mean(base) - 1`` and its standard error from the paired per-batch differences."""
    diff = out - base
    return float(out.mean() / base.mean() - 1), float(diff.std() / math.sqrt(len(diff)) / base.mean())


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


def coupled_start(z: torch.Tensor, n: int) -> torch.Tensor:
    """Exact-marginal coupling of the unit noises ``z [B * n, 2]`` inside each batch of ``n``."""
    return torch.cat([coupled_coordinates(zb) for zb in z.reshape(-1, n, 2)])


def run_batch_size(n, x0, z, sigmas, reference):
    """All methods at batch size ``n``: rows (method, strength, outputs, statistics...)."""
    start = x0 + SIGMA_MAX * z
    base = sample_heun(Guided("none", 0.0, n), start.clone(), sigmas)
    base_d, base_d2 = batch_spreads(base, n)
    runs = [("unguided", 0.0, base)]
    for mode, strengths in (("PG", PG_STRENGTHS), ("EDDY", EDDY_STRENGTHS)):
        for strength in strengths:
            t = time.perf_counter()
            runs.append((mode, strength, sample_heun(Guided(mode.lower(), strength, n), start.clone(), sigmas)))
            print(f"  N={n} {mode} {strength}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    coupled = x0 + SIGMA_MAX * coupled_start(z, n)
    runs.append(("coupled start", 0.0, sample_heun(Guided("none", 0.0, n), coupled, sigmas)))
    rows = []
    for mode, strength, out in runs:
        d, d2 = batch_spreads(out, n)
        rows.append({"n": n, "method": mode, "strength": strength, "out": out, "spread": float(d.mean()),
                     "change": paired_change(d, base_d), "change_sq": paired_change(d2, base_d2),
                     "w1": sliced_w1(out, reference),
                     "p": float("nan") if mode == "unguided" else energy_test(out, base)})
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--particles", type=int, default=1600, help="samples per method and batch size")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    reference = gmm_sample(20000, gen)
    x0 = gmm_sample(args.particles, gen)
    z = torch.randn(args.particles, 2, generator=gen, dtype=torch.float64)
    floor = [sliced_w1(gmm_sample(args.particles, gen), reference) for _ in range(5)]
    sigmas = karras_sigmas(args.steps, SIGMA_MIN, SIGMA_MAX).double()
    rows = [r for n in BATCH_SIZES for r in run_batch_size(n, x0, z, sigmas, reference)]
    print(f"2-D GMM, {args.particles} samples per row (batches of N), Heun {args.steps} steps, "
          f"sigma {SIGMA_MAX}->{SIGMA_MIN}, same x0 and starting noise for every row")
    print(f"sliced-W1 noise floor (exact samples of the same size vs reference): "
          f"{np.mean(floor):.4f} +- {np.std(floor):.4f}")
    print("| N | method | strength | mean pairwise dist | change (+- s.e.) | mean squared dist change (+- s.e.) "
          "| bound on squared, N/(N-1) | sliced W1 to exact | energy test p vs unguided |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        (c, ce), (c2, c2e) = r["change"], r["change_sq"]
        p = "–" if r["method"] == "unguided" else f"{r['p']:.3f}"
        print(f"| {r['n']} | {r['method']} | {r['strength']:g} | {r['spread']:.3f} | {c:+.1%} +- {ce:.1%} | "
              f"{c2:+.1%} +- {c2e:.1%} | +{1 / (r['n'] - 1):.1%} | {r['w1']:.4f} | {p} |")
    plot(rows, reference, float(np.mean(floor)), float(np.std(floor)),
         Path(ROOT / "benchmarks" / "results" / "particle_gmm.png"))


def plot(rows, reference, floor, floor_std, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    colours = {"unguided": "C0", "PG": "C3", "EDDY": "C2", "coupled start": "C4"}
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.6))
    shown_n = 4
    picks = [next(r for r in rows if r["n"] == shown_n and r["method"] == m) for m in ("unguided", "coupled start")]
    picks.insert(1, max((r for r in rows if r["n"] == shown_n and r["method"] == "PG"), key=lambda r: r["strength"]))
    picks.insert(2, max((r for r in rows if r["n"] == shown_n and r["method"] == "EDDY"), key=lambda r: r["strength"]))
    for ax, r in zip(axes[0], picks):
        out = r["out"]
        ax.scatter(reference[:3000, 0], reference[:3000, 1], s=2, c="0.8")
        ax.scatter(out[:, 0], out[:, 1], s=2, c=colours[r["method"]])
        for b, marker in enumerate(("x", "+", "^")):
            ax.scatter(out[b * shown_n:(b + 1) * shown_n, 0], out[b * shown_n:(b + 1) * shown_n, 1], s=50,
                       marker=marker, c="k")
        label = r["method"] + (f" {r['strength']:g}" if r["strength"] else "")
        ax.set_title(f"N={shown_n}, {label}\nspread {r['change'][0]:+.0%}, sliced W1 {r['w1']:.3f}", fontsize=10)
        ax.set_xlim(-4, 4), ax.set_ylim(-4, 4), ax.set_aspect("equal")
    for ax, n in zip(axes[1], BATCH_SIZES):
        rs = [r for r in rows if r["n"] == n]
        for mode in ("PG", "EDDY", "coupled start"):
            pts = [r for r in rs if r["method"] == mode]
            ax.plot([r["change_sq"][0] * 100 for r in pts], [r["w1"] for r in pts], "o-" if len(pts) > 1 else "*",
                    ms=6 if len(pts) > 1 else 14, c=colours[mode], label=mode)
            for r in pts:
                if r["strength"]:
                    ax.annotate(f"{r['strength']:g}", (r["change_sq"][0] * 100, r["w1"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
        ax.axhline(rs[0]["w1"], c="C0", ls="--", label="unguided")
        ax.axhspan(floor - floor_std, floor + floor_std, color="0.85", label="W1 noise floor")
        ax.axvline(100 / (n - 1), c="k", ls=":", label="bound N/(N-1) (exact marginals)")
        ax.set_xlabel("mean squared pairwise distance vs unguided (%)"), ax.set_ylabel("sliced W1 to exact mixture")
        ax.set_title(f"batch N = {n}", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[1][3]
    width = 0.25
    for k, (mode, key) in enumerate((("coupled start", "change_sq"), ("coupled start", "change"))):
        vals = [next(r for r in rows if r["n"] == n and r["method"] == mode)[key][0] * 100 for n in BATCH_SIZES]
        ax.bar(np.arange(len(BATCH_SIZES)) + (k - 0.5) * width, vals, width, color=("C4", "C1")[k],
               label=("squared distance", "distance")[k])
    ax.scatter(np.arange(len(BATCH_SIZES)) - 0.5 * width, [100 / (n - 1) for n in BATCH_SIZES], marker="_", s=600,
               c="k", label="bound on squared")
    ax.set_xticks(np.arange(len(BATCH_SIZES)), [f"N={n}" for n in BATCH_SIZES])
    ax.set_ylabel("coupled start: change vs unguided (%)"), ax.legend(fontsize=8)
    ax.set_title("spread of the coupled start (exact marginals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=85)
    print(f"plot: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
