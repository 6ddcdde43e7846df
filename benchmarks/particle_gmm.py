"""Particle guidance vs EDDY on a 2-D Gaussian mixture with closed-form scores, batch N = 2, 4, 8, two samplers.

    python -m benchmarks.particle_gmm [--particles 1600] [--steps 40]

Exact denoiser of a 4-component 2-D mixture (weights 0.4/0.3/0.2/0.1, std 0.35): ``D(x, s) = x + s^2 grad log
p_s(x)``. For each batch size N the same ``--particles`` starting points (``particles / N`` batches) start from
the exact noised law ``x_T = x0 + sigma_max z`` (Karras sigmas 20 -> 0.005) and are sampled by

- the probability-flow ODE with Heun steps (``guidance.sampling.sample_heun``), and
- Euler ancestral, eta 1 (``guidance.sampling.sample_euler_ancestral``; the same generator seed in every row, so
  every row draws the same raw fresh noise).

Methods (``x0``, ``z`` and the raw noise shared by all rows of a sampler):

- PG: ``D' = D + strength * sigma * sum_j k_ij (D_i - D_j) / sqrt(h)`` (latent space, median bandwidth);
- EDDY drift (paper form): ``D' = D + sigma * strength * v``, ``v = eddy_drift(x, s)`` (exact divergence);
  PG and the drift act for sigma in [0.2, 20] (below that the drift's explicit steps become unstable at
  strength >= 2);
- EDDY (the product's mode; ``guidance.eddy``): the starting noises correlated inside each batch by
  ``eddy_noise(z, strength)`` (equal weights) and, in the ancestral sampler, every fresh draw correlated by
  ``eddy_noise(z, strength, embedded=D(x) of the batch)`` (kernel weights, median bandwidth). Each particle's
  noise is exactly ``N(0, I)`` given the past, so each particle's chain is exactly the unguided chain;
- EDDY (design) (Heun) / EDDY (design, every draw) (ancestral): the product's EDDY mode with start_coupling
  "auto": the exact-marginal design coupling ``guidance.coupling.coupled_coordinates`` (in 2-D the whole space is
  coupled: ``z_i' = ||z_i|| Q d_i``) blended by strength, ``blend(w, design(z), s) = sqrt(1 - s) w +
  sqrt(s) design(z)`` with ``w`` an independent draw (``guidance.eddy.blend``; exactly ``N(0, I)`` per
  sample), for the starting noise and, in the ancestral sampler, for every fresh draw (``w`` from a separate
  seeded generator, so the rows are reproducible and the raw draws ``z`` are those of every other row);
- EDDY drift + coupled start (Heun): the drift on top of the design start, to show that this combination shifts
  the marginal (the drift preserves the law only of independently started particles).

Reported per sampler, N and method: change of the mean pairwise distance and of the mean SQUARED pairwise
distance inside a batch (vs unguided, paired standard error over batches), the bound ``N / (N - 1)`` on the
squared one for any exact-marginal method, sliced W1 of all samples to 20 000 exact mixture samples (noise
floor: iid exact samples of the same size), an energy-distance permutation test against the unguided samples of
the same sampler (all samples; paired with them and, for coupled rows, negatively dependent inside batches, so
conservative), and one against fresh exact samples using one particle per batch (``particles / N`` iid draws
of the marginal: valid whatever the dependence inside a batch, weaker). Runs whose explicit steps blow up are
reported as diverged and left out of the plot. About 5 min on 2 CPU cores. Writes
``benchmarks/results/particle_gmm.png``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from guidance.coupling import coupled_coordinates
from guidance.eddy import blend, eddy_noise
from guidance.eddy_drift import eddy_drift
from guidance.particle import particle_guidance
from guidance.sampling import karras_sigmas, sample_euler_ancestral, sample_heun

ROOT = Path(__file__).resolve().parents[1]

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5], [0.5, -2.5]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
STD = 0.35
BATCH_SIZES = (2, 4, 8)
SIGMA_MAX, SIGMA_MIN = 20.0, 0.005
PG_STRENGTHS = {"heun": [0.05, 0.1, 0.2, 0.5], "ancestral": [0.2, 0.4, 0.8]}  # top ones reach EDDY's spread at N=2
DRIFT_STRENGTHS = [0.5, 1.0]      # 2.0 diverges with 30-40 Heun steps (see BENCHMARKS.md)
EDDY_STRENGTHS = [0.5, 1.0]       # noise correlation strength, |s| <= 1
DRIFT_WITH_COUPLING = 0.5
WINDOW = (0.2, SIGMA_MAX)         # PG and the drift act for sigma in this range
NOISE_SEED = 1                    # fresh-noise generator of the ancestral sampler, the same in every row
BLEND_START_SEED = 2              # the independent half w0 of a blended design start
BLEND_NOISE_SEED = 3              # the independent halves w of the blended design fresh draws
SAMPLERS = ("heun", "ancestral")
SAMPLER_TITLES = {"heun": "Heun probability-flow ODE", "ancestral": "Euler ancestral (eta 1)"}
UNGUIDED, PG, DRIFT = "unguided", "PG", "EDDY drift"
EDDY, DRIFT_COUPLED = "EDDY", "EDDY drift + coupled start"
DESIGN, DESIGN_DRAWS = "EDDY (design)", "EDDY (design, every draw)"  # Heun (start only) / ancestral


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
    """Denoiser wrapper applying PG or the EDDY drift independently inside every batch of ``n`` particles."""

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


def per_batch(fn, t: torch.Tensor, n: int, *others) -> torch.Tensor:
    """``fn`` applied to every batch of ``n`` rows of ``t`` (and the matching batches of ``others``)."""
    parts = zip(t.reshape(-1, n, *t.shape[1:]), *(o.reshape(-1, n, *o.shape[1:]) for o in others))
    return torch.cat([fn(*p) for p in parts])


def coupled_start(z: torch.Tensor, n: int) -> torch.Tensor:
    """Exact-marginal design coupling of the unit noises ``z [B * n, 2]`` inside each batch of ``n``."""
    return per_batch(coupled_coordinates, z, n)


def design_start(z: torch.Tensor, n: int, strength: float) -> torch.Tensor:
    """EDDY's starting noise with start_coupling "auto": ``blend(w0, design(z), s)`` inside each batch of ``n``."""
    w0 = torch.randn(z.shape, generator=torch.Generator().manual_seed(BLEND_START_SEED), dtype=z.dtype)
    return blend(w0, coupled_start(z, n), strength)


def eddy_start(z: torch.Tensor, n: int, strength: float) -> torch.Tensor:
    """EDDY's starting noise: ``z`` correlated with equal weights inside each batch of ``n``."""
    return per_batch(lambda zb: eddy_noise(zb, strength), z, n)


def kernel_correlation(n: int, strength: float):
    """The sampler's ``correlate`` hook: each fresh draw correlated by the kernel of the batch's predictions."""
    def correlate(z, denoised, sigma):
        return per_batch(lambda zb, db: eddy_noise(zb, strength, embedded=db), z, n, denoised)
    return correlate


def design_correlation(n: int, strength: float):
    """The sampler's ``correlate`` hook for EDDY with the design: every fresh draw ``blend(w, design(z), s)``."""
    gen = torch.Generator().manual_seed(BLEND_NOISE_SEED)

    def correlate(z, denoised, sigma):
        w = torch.randn(z.shape, generator=gen, dtype=z.dtype)
        return blend(w, coupled_start(z, n), strength)
    return correlate


def row_specs(sampler: str):
    """``(method, strength, start, guide mode, guide strength, fresh noise)`` per row; start "independent",
    "design" (the pure design) or ``(kind, s)`` with kind "eddy"/"design"; fresh noise 0 (iid), ``s`` (kernel
    ``eddy_noise``) or ``("design", s)`` (design blended by ``s``)."""
    rows = [(UNGUIDED, 0.0, "independent", "none", 0.0, 0.0)]
    rows += [(PG, s, "independent", "pg", s, 0.0) for s in PG_STRENGTHS[sampler]]
    rows += [(DRIFT, s, "independent", "eddy", s, 0.0) for s in DRIFT_STRENGTHS]
    if sampler == "heun":
        rows += [(EDDY, s, ("eddy", s), "none", 0.0, 0.0) for s in EDDY_STRENGTHS]
        rows += [(DESIGN, s, ("design", s), "none", 0.0, 0.0) for s in EDDY_STRENGTHS]
        rows += [(DRIFT_COUPLED, DRIFT_WITH_COUPLING, "design", "eddy", DRIFT_WITH_COUPLING, 0.0)]
    else:
        rows += [(EDDY, s, ("eddy", s), "none", 0.0, s) for s in EDDY_STRENGTHS]
        rows += [(DESIGN_DRAWS, s, ("design", s), "none", 0.0, ("design", s)) for s in EDDY_STRENGTHS]
    return rows


def run_row(sampler, spec, n, x0, z, sigmas):
    _, _, start, mode, strength, corr = spec
    if start == "design":
        z = coupled_start(z, n)
    elif start != "independent":
        z = (design_start if start[0] == "design" else eddy_start)(z, n, start[1])
    if isinstance(corr, tuple):
        correlate = design_correlation(n, corr[1])
    else:
        correlate = kernel_correlation(n, corr) if corr else None
    model = Guided(mode, strength, n)
    if sampler == "heun":
        return sample_heun(model, x0 + SIGMA_MAX * z, sigmas)
    return sample_euler_ancestral(model, x0 + SIGMA_MAX * z, sigmas, eta=1.0,
                                  generator=torch.Generator().manual_seed(NOISE_SEED),
                                  correlate=correlate)


def batch_spreads(samples: torch.Tensor, n: int):
    """Per batch: mean pairwise distance and mean squared pairwise distance over ordered pairs, ``[B]`` each."""
    b = samples.reshape(-1, n, 2)
    dist = torch.cdist(b, b)
    return dist.sum((1, 2)) / (n * (n - 1)), dist.square().sum((1, 2)) / (n * (n - 1))


def paired_change(out: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """``mean(out) / mean(base) - 1`` and its standard error from the paired per-batch differences."""
    diff = out - base
    return float(out.mean() / base.mean() - 1), float(diff.std() / math.sqrt(len(diff)) / base.mean())


def _sliced_quantiles(a: torch.Tensor, projections: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    theta = torch.rand(projections, generator=gen, dtype=torch.float64) * math.pi
    dirs = torch.stack([theta.cos(), theta.sin()], 1)
    qs = torch.linspace(0.0005, 0.9995, 2000, dtype=torch.float64)
    return torch.quantile(a @ dirs.t(), qs, dim=0)


class SlicedW1:
    """Sliced W1 (256 fixed directions, 2000 quantiles) of a sample to a fixed ``reference`` sample."""

    def __init__(self, reference: torch.Tensor):
        self.reference = _sliced_quantiles(reference)

    def __call__(self, a: torch.Tensor) -> float:
        return float((_sliced_quantiles(a) - self.reference).abs().mean())


def sliced_w1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sliced W1 between two samples (one-off form of ``SlicedW1``)."""
    return SlicedW1(b)(a)


def energy_test(a: torch.Tensor, b: torch.Tensor, permutations: int = 1000) -> float:
    """Permutation p-value of the energy distance ``2 E|A - B| - E|A - A'| - E|B - B'|`` between samples ``a`` and
    ``b`` (V-statistic; all permutations from one distance matrix)."""
    gen = torch.Generator().manual_seed(7)
    pooled = torch.cat([a, b]).double()
    dist = torch.cdist(pooled, pooled)
    na, nb, total = len(a), len(b), dist.sum()
    masks = torch.zeros(permutations + 1, len(pooled), dtype=torch.float64)
    masks[0, :na] = 1
    for k in range(1, permutations + 1):
        masks[k, torch.randperm(len(pooled), generator=gen)[:na]] = 1
    dm = masks @ dist
    s_aa = (dm * masks).sum(1)
    s_ab = dm.sum(1) - s_aa
    s_bb = total - s_aa - 2 * s_ab
    stat = 2 * s_ab / (na * nb) - s_aa / na ** 2 - s_bb / nb ** 2
    return (int((stat[1:] >= stat[0]).sum()) + 1) / (permutations + 1)


def one_per_batch(out: torch.Tensor, n: int) -> torch.Tensor:
    """Particle ``b mod n`` of every batch ``b``: iid draws of the marginal whatever the dependence in a batch."""
    b = out.reshape(-1, n, 2)
    idx = torch.arange(b.shape[0])
    return b[idx, idx % n]


def diverged(out: torch.Tensor) -> bool:
    """The mixture lives in [-4, 4]^2: a sample beyond 100 (or NaN/inf) means the explicit steps blew up."""
    return not bool(torch.isfinite(out).all()) or float(out.abs().max()) > 100


def run_batch_size(sampler, n, x0, z, sigmas, w1, exact_iid):
    """All rows of ``sampler`` at batch size ``n``: dicts with the outputs and statistics."""
    rows, base = [], None
    for spec in row_specs(sampler):
        t = time.perf_counter()
        out = run_row(sampler, spec, n, x0, z, sigmas)
        print(f"  {sampler} N={n} {spec[0]} {spec[1]:g}: {time.perf_counter() - t:.1f} s", file=sys.stderr,
              flush=True)
        row = {"sampler": sampler, "n": n, "method": spec[0], "strength": spec[1], "out": out,
               "diverged": diverged(out)}
        rows.append(row)
        if row["diverged"]:
            continue
        if base is None:
            base = out
            base_d, base_d2 = batch_spreads(base, n)
        d, d2 = batch_spreads(out, n)
        row.update(spread=float(d.mean()), change=paired_change(d, base_d), change_sq=paired_change(d2, base_d2),
                   w1=w1(out), p=float("nan") if spec[0] == UNGUIDED else energy_test(out, base),
                   p_exact=energy_test(one_per_batch(out, n), exact_iid[:len(out) // n]))
    return rows


def print_table(rows, sampler):
    print(f"\n{SAMPLER_TITLES[sampler]}")
    print("| N | method | strength | mean pairwise dist | change (+- s.e.) | mean squared dist change (+- s.e.) "
          "| bound on squared, N/(N-1) | sliced W1 to exact | energy p vs unguided | energy p vs exact, 1 per batch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in (r for r in rows if r["sampler"] == sampler):
        head = f"| {r['n']} | {r['method']} | {r['strength']:g} |"
        bound = f"+{1 / (r['n'] - 1):.1%}"
        if r["diverged"]:
            big = float(r["out"].abs().nan_to_num(float("inf")).max())
            print(f"{head} diverged (max abs coordinate {big:.1e}) | – | – | {bound} | – | – | – |")
            continue
        (c, ce), (c2, c2e) = r["change"], r["change_sq"]
        p = "–" if r["method"] == UNGUIDED else f"{r['p']:.3f}"
        print(f"{head} {r['spread']:.3f} | {c:+.1%} +- {ce:.1%} | {c2:+.1%} +- {c2e:.1%} | {bound} | "
              f"{r['w1']:.4f} | {p} | {r['p_exact']:.3f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--particles", type=int, default=1600, help="samples per row and batch size")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if args.particles % math.lcm(*BATCH_SIZES):
        parser.error(f"--particles must be a multiple of {math.lcm(*BATCH_SIZES)}, got {args.particles}")
    gen = torch.Generator().manual_seed(0)
    reference = gmm_sample(20000, gen)
    x0 = gmm_sample(args.particles, gen)
    z = torch.randn(args.particles, 2, generator=gen, dtype=torch.float64)
    w1 = SlicedW1(reference)
    floor = [w1(gmm_sample(args.particles, gen)) for _ in range(5)]
    exact_iid = gmm_sample(args.particles, gen)
    sigmas = karras_sigmas(args.steps, SIGMA_MIN, SIGMA_MAX).double()
    t = time.perf_counter()
    rows = [r for s in SAMPLERS for n in BATCH_SIZES for r in run_batch_size(s, n, x0, z, sigmas, w1, exact_iid)]
    print(f"2-D GMM, {args.particles} samples per row (batches of N), {args.steps} Karras steps "
          f"sigma {SIGMA_MAX}->{SIGMA_MIN}, same x0, starting noise and fresh-noise seed in every row")
    print(f"sliced-W1 noise floor (iid exact samples of the same size vs reference): "
          f"{np.mean(floor):.4f} +- {np.std(floor):.4f}")
    for sampler in SAMPLERS:
        print_table(rows, sampler)
    print(f"\ntotal {time.perf_counter() - t:.0f} s")
    plot(rows, reference, float(np.mean(floor)), float(np.std(floor)),
         Path(ROOT / "benchmarks" / "results" / "particle_gmm.png"))


STYLE = {UNGUIDED: ("C0", "o"), PG: ("C3", "o"), DRIFT: ("C8", "v"), EDDY: ("C2", "D"), DESIGN: ("C4", "*"),
         DESIGN_DRAWS: ("C4", "*"), DRIFT_COUPLED: ("C1", "X")}


def _label(r) -> str:
    return r["method"] + (f" {r['strength']:g}" if r["strength"] else "")


def _pick(rows, sampler, n, method, strength=None):
    return next(r for r in rows if r["sampler"] == sampler and r["n"] == n and r["method"] == method
                and (strength is None or r["strength"] == strength))


def plot(rows, reference, floor, floor_std, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 5, figsize=(24, 10))
    plot_scatter(axes[0], rows, reference, "heun", 4)
    for ax, n in zip(axes[1], BATCH_SIZES):
        plot_tradeoff(ax, rows, n, floor, floor_std)
    plot_bound(axes[1][3], rows)
    handles, labels = axes[1][0].get_legend_handles_labels()
    axes[1][4].axis("off")
    axes[1][4].legend(handles, labels, loc="center", fontsize=9, title="lower panels (diverged runs left out)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"plot: {path.relative_to(ROOT)}")


def plot_scatter(axes, rows, reference, sampler, n):
    """Top row: unguided, EDDY 1, PG at the spread closest to EDDY 1's, EDDY drift 1, drift + coupled start."""
    eddy = _pick(rows, sampler, n, EDDY, 1.0)
    target = 0.0 if eddy["diverged"] else eddy["change"][0]
    pgs = [r for r in rows if r["sampler"] == sampler and r["n"] == n and r["method"] == PG]
    pg = min((r for r in pgs if not r["diverged"]), key=lambda r: abs(r["change"][0] - target), default=pgs[0])
    picks = [_pick(rows, sampler, n, UNGUIDED), eddy, pg, _pick(rows, sampler, n, DRIFT, 1.0),
             _pick(rows, sampler, n, DRIFT_COUPLED)]
    for ax, r in zip(axes, picks):
        ax.scatter(reference[:3000, 0], reference[:3000, 1], s=2, c="0.8")
        title = f"{_label(r)}  ({SAMPLER_TITLES[sampler].split()[0]}, N={n})"
        if r["diverged"]:
            ax.set_title(f"{title}\ndiverged (not drawn)", fontsize=10)
        else:
            out = r["out"]
            ax.scatter(out[:, 0], out[:, 1], s=2, c=STYLE[r["method"]][0])
            for b, marker in enumerate(("x", "+", "^")):
                ax.scatter(out[b * n:(b + 1) * n, 0], out[b * n:(b + 1) * n, 1], s=60, marker=marker, c="k")
            ax.set_title(f"{title}\nmean pairwise distance {r['change'][0]:+.1%}, sliced W1 {r['w1']:.3f}\n"
                         f"energy p vs exact {r['p_exact']:.3f}", fontsize=10)
        ax.set_xlim(-4, 4), ax.set_ylim(-4, 4), ax.set_aspect("equal")


def plot_tradeoff(ax, rows, n, floor, floor_std):
    """Spread gain vs sliced W1 for every method, solid = Heun, dashed/open = ancestral."""
    for sampler, ls, fill in (("heun", "-", "full"), ("ancestral", "--", "none")):
        rs = [r for r in rows if r["sampler"] == sampler and r["n"] == n]
        for method, (colour, marker) in STYLE.items():
            pts = [r for r in rs if r["method"] == method and not r["diverged"]]
            if not pts:
                continue
            label = f"{method} ({'Heun' if sampler == 'heun' else 'ancestral'})"
            ax.plot([r["change"][0] * 100 for r in pts], [r["w1"] for r in pts], ls=ls, marker=marker,
                    fillstyle=fill, ms=12 if marker in "*X" else 7, c=colour, label=label)
            for r in pts:
                if r["strength"] and method in (PG, EDDY, DRIFT, DESIGN, DESIGN_DRAWS):
                    ax.annotate(f"{r['strength']:g}", (r["change"][0] * 100, r["w1"]), textcoords="offset points",
                                xytext=(5, 3), fontsize=7, color=colour)
    ax.axhspan(floor - floor_std, floor + floor_std, color="0.88", label="W1 noise floor (iid)")
    ax.axvline(20, c="k", ls=":", lw=1, label="target +20%")
    ax.set_yscale("log")
    ax.set_xlabel("mean pairwise distance in a batch vs unguided (%)"), ax.set_ylabel("sliced W1 to exact mixture")
    ax.set_title(f"batch N = {n}: spread vs marginal\n(filled/solid: Heun ODE, open/dashed: Euler ancestral)",
                 fontsize=10)


def plot_bound(ax, rows):
    """Exact-marginal rows: squared-distance gain against the N/(N-1) bound, and the distance gain."""
    picks = (("heun", EDDY, 1.0, "EDDY 1 (Heun: start only)", "C2", ""),
             ("ancestral", EDDY, 1.0, "EDDY 1 (ancestral)", "C2", "//"),
             ("heun", DESIGN, 1.0, "EDDY (design) 1 (Heun: start only)", "C4", ""),
             ("ancestral", DESIGN_DRAWS, 1.0, "EDDY (design, every draw) 1 (ancestral)", "C4", "//"))
    width = 0.2
    x = np.arange(len(BATCH_SIZES))
    for k, (sampler, method, strength, label, colour, hatch) in enumerate(picks):
        rs = [_pick(rows, sampler, n, method, strength) for n in BATCH_SIZES]
        pos = x + (k - (len(picks) - 1) / 2) * width
        ax.bar(pos, [r["change_sq"][0] * 100 for r in rs], width, color=colour, alpha=0.45, hatch=hatch,
               edgecolor=colour, label=f"{label}: squared distance")
        ax.scatter(pos, [r["change"][0] * 100 for r in rs], marker="o", c="k", s=25, zorder=3,
                   label="distance" if k == 0 else None)
    ax.scatter(x, [100 / (n - 1) for n in BATCH_SIZES], marker="_", s=2500, c="k", linewidths=2,
               label="bound on squared, N/(N-1)")
    ax.axhline(20, c="k", ls=":", lw=1, label="target +20% (distance)")
    ax.set_xticks(x, [f"N={n}" for n in BATCH_SIZES])
    ax.set_ylabel("change vs unguided (%)"), ax.set_ylim(0, 185), ax.legend(fontsize=7.5, loc="upper right")
    ax.set_title("exact-marginal EDDY: spread gain vs the bound\n(bars: squared distance, dots: distance)", fontsize=10)


if __name__ == "__main__":
    main()
