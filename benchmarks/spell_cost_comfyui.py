"""Cost of SPELL: per-step correction time and sampling-run time ratio in the real ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python -m benchmarks.spell_cost_comfyui [--steps 2] [--repeats 2]

Part A times the correction alone (batch 8, 4x64x64 latents, K = 1k / 10k shields, intra-batch on), both
for the common case (no prediction inside a shield) and with hits. Part B runs ComfyUI's real KSampler
with a randomly initialised SD1.5-shaped UNet (320 channels, context 768: the real model's cost) on a
batch of 8 64x64 latents (512 px), with and without SPELL, interleaved in one process.
"""
import argparse
import math
import statistics
import time

import torch

from guidance.shields import TensorShields
from guidance.spell import sparse_repellency

from . import comfy_host as host

SHAPE = (4, 64, 64)
BATCH = 8


def clustered_shields(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, k // 100), *SHAPE, generator=g)
    pick = torch.randint(0, centres.shape[0], (k,), generator=g)
    return centres[pick] + 0.5 * torch.randn(k, *SHAPE, generator=g)


def time_correction(shields: TensorShields, x0: torch.Tensor, radius: float, repeats: int = 15) -> float:
    sparse_repellency(x0, radius, shields=shields, intra_batch=True)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sparse_repellency(x0, radius, shields=shields, intra_batch=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def part_a():
    print("Part A: correction per model evaluation (median ms), batch 8, 4x64x64, intra-batch on")
    print("| shields K | no hit (ms) | with hits (ms) | hits per batch |")
    print("|---|---|---|---|")
    radius = 0.3 * math.sqrt(math.prod(SHAPE))
    rows = {}
    for k in (1000, 10000):
        z = clustered_shields(k)
        src = TensorShields(z)
        far = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(1)) * 1.5
        near = z[:BATCH] + 0.1 * torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(2))
        hits = int(sparse_repellency(near, radius, shields=src).shields_hit.sum())
        rows[k] = (time_correction(src, far, radius), time_correction(src, near, radius))
        print(f"| {k} | {rows[k][0]:.1f} | {rows[k][1]:.1f} | {hits} |")
    return rows


def part_b(steps: int, repeats: int):
    nodes = host.boot_comfy()
    spell_nodes = host.pack_submodule("nodes.spell_nodes")
    model = host.random_model(unet_config=host.sd15_unet_config())
    latent = {"samples": torch.zeros(BATCH, *SHAPE)}
    pos, neg = host.conditioning(1, 77, 768), host.conditioning(2, 77, 768)
    variants = {"plain": model}
    for k in (1000, 10000):
        shield_set = spell_nodes.ShieldSet.from_latents(clustered_shields(k) / 0.18215, name=f"{k}")
        variants[f"K={k}"] = spell_nodes.ApplySpell().apply(
            model, radius=0.3, overcompensation=1.0, intra_batch=True, history=False, history_name="bench",
            history_size=8, start_percent=0.0, end_percent=1.0, exact=False, shield_set=shield_set)[0]
    timings = {name: [] for name in variants}
    for r in range(repeats):
        for name, m in variants.items():
            t = time.perf_counter()
            nodes.KSampler().sample(m, 0, steps, 7.0, "euler", "normal", pos, neg, latent)
            timings[name].append(time.perf_counter() - t)
            print(f"  repeat {r} {name}: {timings[name][-1]:.1f} s", flush=True)
    base = statistics.median(timings["plain"])
    print(f"\nPart B: real KSampler, SD1.5-shaped UNet, batch {BATCH}, 64x64 latents, {steps} euler steps, "
          f"cfg 7, median of {repeats}")
    print("| variant | run time (s) | ratio vs plain |")
    print("|---|---|---|")
    for name, ts in timings.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {statistics.median(ts) / base:.4f} |")
    return base / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-comfy", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = part_a()
    if args.skip_comfy:
        return
    step = part_b(args.steps, args.repeats)
    print(f"\nModel step (batch {BATCH} x cond/uncond) {step:.1f} s; correction/step at K=10k "
          f"{rows[10000][0]:.1f} ms (no hit) -> predicted ratio {1 + rows[10000][0] / 1000 / step:.4f}")


if __name__ == "__main__":
    main()
