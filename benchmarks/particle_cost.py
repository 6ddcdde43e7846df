"""Step-time cost of particle guidance / EDDY (latent mode, batch 16) next to a real model call.

    python benchmarks/particle_cost.py [--rounds 3]

(1) Real model: the terrain consistency UNet of ``adaptive-terrain-diffusion`` (``benchmarks/terrain_model.py``,
ONNX on CPU, 128x128x1, batch 16). One "step" = one denoiser call; the plain, PG and EDDY variants are
interleaved round by round in one process so machine-load noise hits all of them alike; ratio = median
guided step time / median plain step time.
(2) Guidance alone, no model, on SD-sized latents (4x64x64 = SD1.5 at 512 px, 4x128x128 = SDXL at 1024 px,
batch 16), median of 20 calls: add this to your own model's step time to get the ratio on your machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # script: make the repo's packages importable

from benchmarks.terrain_model import TerrainDenoiser, unavailable_reason  # noqa: E402
from guidance.eddy import eddy_drift  # noqa: E402
from guidance.embeddings import make_embedding  # noqa: E402
from guidance.particle import particle_guidance  # noqa: E402

LATENT = make_embedding("latent")


def pg_step(x, d, sigma):
    return d + particle_guidance(d, 0.2, LATENT, sigma=sigma).delta


def eddy_step(x, d, sigma):
    return d + sigma * 0.2 * eddy_drift(x, (d - x) / sigma ** 2, LATENT)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def real_model(rounds: int):
    model = TerrainDenoiser(difficulty=50)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 128, 128, generator=gen) * 10.0
    sig = torch.full((16,), 10.0)
    model(x, sig)                                         # warm-up
    times = {"plain": [], "PG": [], "EDDY": []}
    for _ in range(rounds):
        times["plain"].append(timed(lambda: model(x, sig)))
        times["PG"].append(timed(lambda: pg_step(x, model(x, sig), 10.0)))
        times["EDDY"].append(timed(lambda: eddy_step(x, model(x, sig), 10.0)))
    return {k: statistics.median(v) for k, v in times.items()}


def guidance_only(shape, calls=20):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen) * 5
    d = torch.randn(*shape, generator=gen)
    out = {}
    for name, fn in (("PG", pg_step), ("EDDY", eddy_step)):
        fn(x, d, 5.0)
        out[name] = statistics.median(timed(lambda: fn(x, d, 5.0)) for _ in range(calls))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print("Guidance alone (latent mode, batch 16, median of 20 calls):")
    print("| latent | PG ms | EDDY ms |")
    print("|---|---|---|")
    for shape in ((16, 4, 64, 64), (16, 4, 128, 128)):
        t = guidance_only(shape)
        print(f"| {'x'.join(map(str, shape[1:]))} | {t['PG'] * 1e3:.1f} | {t['EDDY'] * 1e3:.1f} |")
    reason = unavailable_reason()
    if reason:
        print(f"\nreal-model ratio skipped: {reason}")
        return
    t = real_model(args.rounds)
    print(f"\nReal model: terrain consistency UNet (ONNX, CPU), batch 16 x 1x128x128, median of {args.rounds} "
          "interleaved rounds:")
    print("| variant | s / step | ratio vs plain |")
    print("|---|---|---|")
    for k in ("plain", "PG", "EDDY"):
        print(f"| {k} | {t[k]:.2f} | {t[k] / t['plain']:.3f} |")


if __name__ == "__main__":
    main()
