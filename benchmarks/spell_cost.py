"""Cost of SPELL (paper Table 5): guided / unguided time per sample, variants interleaved in one process.

Terrain consistency UNet (ONNX Runtime, CPU), batches of 8, 6 consistency steps. Variants: no SPELL;
intra-batch; intra-batch + 64 history shields; intra-batch + 2,000 random shields in the model's
16,384-d space (exact tensor search). Rounds interleave the variants so machine load hits all alike;
the table reports the median over rounds.

    python -m benchmarks.spell_cost           # ~5 min on 2 busy CPU cores
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from demo.terrain_model import CONSISTENCY_SIGMAS, TerrainDenoiser
from guidance.sampling import SpellWrapper, sample

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--radius", type=float, default=20.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = TerrainDenoiser(difficulty=40)
    gen = torch.Generator().manual_seed(0)
    history = model(torch.randn(64, 1, 128, 128, generator=gen) * 80, torch.full((64,), 80.0))
    many = torch.randn(2_000, 1, 128, 128, generator=gen) * 0.3 - 0.6
    variants = {
        "no SPELL": lambda: model,
        "SPELL intra-batch": lambda: SpellWrapper(model, args.radius, intra_batch=True),
        "SPELL intra-batch + 64 history shields": lambda: SpellWrapper(model, args.radius, shields=history,
                                                                       intra_batch=True),
        "SPELL intra-batch + 2,000 random shields": lambda: SpellWrapper(model, args.radius, shields=many, intra_batch=True),
    }
    times = {k: [] for k in variants}
    for rnd in range(args.rounds):
        for name, make in variants.items():
            m = make()
            noise = torch.randn(8, 1, 128, 128, generator=torch.Generator().manual_seed(rnd))
            t = time.perf_counter()
            sample(m, noise, CONSISTENCY_SIGMAS, sampler="consistency", generator=torch.Generator().manual_seed(9))
            times[name].append((time.perf_counter() - t) / 8)
    base = statistics.median(times["no SPELL"])
    print(f"terrain consistency UNet, batch 8, {len(CONSISTENCY_SIGMAS) - 1} steps, radius {args.radius}, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| variant | s / sample | relative to no SPELL |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {med / base:.3f}x |")
    plot(times)
    return 0


def plot(times):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 3))
    names = list(times)
    ax.barh(range(len(names)), [statistics.median(times[n]) for n in names], color="tab:orange")
    for i, n in enumerate(names):
        ax.plot(times[n], [i] * len(times[n]), "k.", ms=4)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("seconds per sample (bars: median, dots: rounds)")
    fig.tight_layout()
    fig.savefig(RESULTS / "spell_cost.png", dpi=110)
    print(f"\nplot: {RESULTS / 'spell_cost.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
