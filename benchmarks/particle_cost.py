"""Step-time cost of particle guidance / EDDY / EDDY drift (latent mode, batch 16) next to a real model call.

    python -m benchmarks.particle_cost [--rounds 3]

(1) Real model: the terrain consistency UNet of ``adaptive-terrain-diffusion`` (``demo/terrain_model.py``,
ONNX on CPU, 128x128x1, batch 16). One "step" = one denoiser call plus the step's guidance work: plain = a
fresh ``randn`` draw, PG = the repulsion, EDDY = one fresh draw correlated by the prediction's kernel (what an
ancestral/SDE step costs with EDDY), EDDY drift = the paper-form drift. The variants are interleaved round by
round in one process so machine-load noise hits all of them alike; ratio = median guided / median plain.
(2) Guidance alone, no model, on SD-sized latents (4x64x64 = SD1.5 at 512 px, 4x128x128 = SDXL at 1024 px,
batch 16), median of 20 calls: add this to your own model's step time to get the ratio on your machine. Also
the pooled 8x8 space (the node's default; autograd pull-back) and the start coupling (``couple_noise``, 4x4
grid), which runs once per sampler run, not per step.

Run it on an idle machine (the numbers in BENCHMARKS.md were taken under ``flock /tmp/bench.lock`` at a load
average below 1.5).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from demo.terrain_model import TerrainDenoiser, unavailable_reason
from guidance.coupling import couple_noise
from guidance.eddy import blend, eddy_noise
from guidance.eddy_drift import eddy_drift
from guidance.embeddings import make_embedding
from guidance.particle import particle_guidance

LATENT = make_embedding("latent")
POOLED = make_embedding("pooled", 8)


def pg_step(x, d, sigma, emb=LATENT):
    return d + particle_guidance(d, 0.2, emb, sigma=sigma).delta


def eddy_drift_step(x, d, sigma, emb=LATENT):
    return d + sigma * 0.2 * eddy_drift(x, (d - x) / sigma ** 2, emb)


def eddy_noise_step(x, d, sigma, emb=LATENT):
    """EDDY mode's per-step work: one fresh draw correlated by the kernel of the prediction (plain: ``randn``)."""
    return d, eddy_noise(torch.randn_like(x), 1.0, emb(d))


def eddy_design_step(x, d, sigma):
    """EDDY's default ('auto'): a fresh draw from the 2x2 design, blended with an independent one (strength 0.8)."""
    return d, blend(torch.randn_like(x), couple_noise(torch.randn_like(x), 2), 0.8)


def plain_noise_step(x, d, sigma):
    return d, torch.randn_like(x)


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
    times = {"plain": [], "PG": [], "EDDY": [], "EDDY design": [], "EDDY drift": []}
    for _ in range(rounds):
        times["plain"].append(timed(lambda: plain_noise_step(x, model(x, sig), 10.0)))
        times["PG"].append(timed(lambda: pg_step(x, model(x, sig), 10.0)))
        times["EDDY"].append(timed(lambda: eddy_noise_step(x, model(x, sig), 10.0)))
        times["EDDY design"].append(timed(lambda: eddy_design_step(x, model(x, sig), 10.0)))
        times["EDDY drift"].append(timed(lambda: eddy_drift_step(x, model(x, sig), 10.0)))
    return {k: statistics.median(v) for k, v in times.items()}


def guidance_only(shape, calls=20):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen) * 5
    d = torch.randn(*shape, generator=gen)
    variants = {"PG": lambda: pg_step(x, d, 5.0),
                "EDDY": lambda: eddy_noise_step(x, d, 5.0), "plain noise": lambda: plain_noise_step(x, d, 5.0),
                "EDDY design": lambda: eddy_design_step(x, d, 5.0),
                "EDDY drift": lambda: eddy_drift_step(x, d, 5.0),
                "PG pooled": lambda: pg_step(x, d, 5.0, POOLED), "EDDY pooled": lambda: eddy_noise_step(x, d, 5.0, POOLED),
                "coupling": lambda: couple_noise(d, 4)}
    out = {}
    for name, fn in variants.items():
        fn()
        out[name] = statistics.median(timed(fn) for _ in range(calls))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print("Guidance alone (batch 16, median of 20 calls):")
    print("| latent | PG latent ms | EDDY kernel latent ms (plain randn draw) | EDDY design 2x2 ms | EDDY drift "
          "latent ms | PG pooled 8x8 ms | EDDY kernel pooled 8x8 ms | start coupling 4x4 ms (once per run) |")
    print("|---|---|---|---|---|---|---|---|")
    alone = {}
    for shape in ((16, 1, 128, 128), (16, 4, 64, 64), (16, 4, 128, 128)):
        t = alone[shape] = {k: v * 1e3 for k, v in guidance_only(shape).items()}
        print(f"| {'x'.join(map(str, shape[1:]))} | {t['PG']:.2f} | {t['EDDY']:.2f} ({t['plain noise']:.2f}) | "
              f"{t['EDDY design']:.2f} | {t['EDDY drift']:.2f} | {t['PG pooled']:.2f} | {t['EDDY pooled']:.2f} | {t['coupling']:.2f} |")
    reason = unavailable_reason()
    if reason:
        print(f"\nreal-model ratio skipped: {reason}")
        return
    t = real_model(args.rounds)
    terrain = alone[(16, 1, 128, 128)]
    print(f"\nReal model: terrain consistency UNet (ONNX, CPU), batch 16 x 1x128x128, median of {args.rounds} "
          "interleaved rounds; 'resolved ratio' = 1 + guidance alone (same latent shape) / plain step:")
    print("| variant | s / step | interleaved ratio vs plain | resolved ratio |")
    print("|---|---|---|---|")
    for k in ("plain", "PG", "EDDY", "EDDY design", "EDDY drift"):
        extra = {"plain": 0.0, "EDDY": terrain["EDDY"] - terrain["plain noise"],
                 "EDDY design": terrain["EDDY design"] - terrain["plain noise"]}.get(k, terrain.get(k, 0.0))
        resolved = 1 + extra / 1e3 / t["plain"]
        print(f"| {k} | {t[k]:.3f} | {t[k] / t['plain']:.4f} | {resolved:.5f} |")


if __name__ == "__main__":
    main()
