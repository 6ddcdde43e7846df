"""Sparsity of SPELL (paper Fig. 5 / Appendix H): when and how strongly it corrects, on the terrain model.

Setting as in the paper's Fig. 11: batches of 8 repelling within the batch and from all earlier batches
(``SpellWrapper(intra_batch=True, history=True)``), several batches in sequence, for a few radii /
overcompensations. Per consistency step: share of trajectories with a non-zero correction, mean
relative magnitude ``||lambda Delta|| / ||x - x0_hat||`` (= the correction's share of the score, since
both are divided by sigma^2) over corrected trajectories, and the share whose repellency has finished
(zero from this step on).

    python -m benchmarks.spell_sparsity          # ~5-10 min on 2 busy CPU cores
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from demo.terrain_model import CONSISTENCY_SIGMAS, TerrainDenoiser
from guidance.kernels import median_pairwise_distance
from guidance.sampling import SpellWrapper, sample

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"


def batches(model, wrapper, n_batches, label):
    outs = []
    for g in range(n_batches):
        seed = 500 + 100 * label + g
        noise = torch.randn(8, 1, 128, 128, generator=torch.Generator().manual_seed(seed))
        outs.append(sample(wrapper or model, noise, CONSISTENCY_SIGMAS, sampler="consistency",
                           generator=torch.Generator().manual_seed(seed + 1)))
    return torch.cat(outs)


def stats(wrapper):
    """Per step: (share active, mean relative magnitude of active, share finished) over all trajectories."""
    act = torch.cat([r.active_matrix() for r in wrapper.runs], 1)          # [steps, trajectories]
    rel = torch.cat([r.relative_matrix() for r in wrapper.runs], 1)
    later = act.flip(0).cummax(0).values.flip(0)                           # active now or later
    share = act.float().mean(1)
    mag = torch.stack([rel[i][act[i]].mean() if act[i].any() else torch.tensor(0.0) for i in range(len(act))])
    return share, mag, 1 - later.float().mean(1), rel[act].max().item() if act.any() else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3, help="batches of 8 per label, in sequence")
    ap.add_argument("--labels", type=int, nargs="+", default=[60])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    configs = [("r = 0.6 x median", 0.6, 1.0), ("r = 0.6 x median, lambda = 2", 0.6, 2.0)]
    results = {}
    for label in args.labels:
        model = TerrainDenoiser(difficulty=label)
        med = median_pairwise_distance(batches(model, None, 1, label))
        for name, f, lam in configs:
            w = SpellWrapper(model, f * med, intra_batch=True, history=True, overcompensation=lam)
            batches(model, w, args.batches, label)
            results.setdefault(name, []).append(stats(w))
    sig = CONSISTENCY_SIGMAS[:-1].tolist()
    print(f"terrain consistency UNet, labels {args.labels}, {args.batches} batches of 8 in sequence, intra-batch + "
          f"history SPELL; {len(sig)} consistency steps\n")
    print("| setting | " + " | ".join(f"sigma {s:g}" for s in sig) + " | max relative |")
    print("|---|" + "---|" * (len(sig) + 1))
    summary = {}
    for name, lst in results.items():
        share = torch.stack([s[0] for s in lst]).mean(0)
        mag = torch.stack([s[1] for s in lst]).mean(0)
        done = torch.stack([s[2] for s in lst]).mean(0)
        top = max(s[3] for s in lst)
        summary[name] = (share, mag, done)
        cells = " | ".join(f"{a * 100:.0f}% / {m * 100:.2f}% / {d * 100:.0f}%" for a, m, d in zip(share, mag, done))
        print(f"| {name} | {cells} | {top * 100:.2f}% |")
    print("\ncell = share of trajectories corrected / mean relative magnitude of the corrections / share whose "
          "repellency has finished")
    plot(summary, sig)
    return 0


def plot(summary, sig):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, (share, mag, done) in summary.items():
        axes[0].plot(range(len(sig)), (share * 100).tolist(), "o-", label=name)
        axes[1].plot(range(len(sig)), (mag * 100).tolist(), "o-", label=name)
    for ax, yl in zip(axes, ["% of trajectories corrected", "mean ||correction|| / ||score|| (%)"]):
        ax.set_xticks(range(len(sig)), [f"{s:g}" for s in sig])
        ax.set_xlabel("sigma (sampling goes left to right)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SPELL sparsity on the terrain model (intra-batch + history)")
    fig.tight_layout()
    fig.savefig(RESULTS / "spell_sparsity.png", dpi=110)
    print(f"\nplot: {RESULTS / 'spell_sparsity.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
