"""DNG step time / plain CFG step time in the real ComfyUI (KSampler, euler, CPU).

Run with ComfyUI's Python: ``COMFYUI_PATH=/path/to/ComfyUI python -m benchmarks.dng_step_time``.
Two randomly initialised models in a real ModelPatcher: a tiny SD1.5-config UNet (32 channels,
latent 4x4x4) and an SD1.5-shaped UNet (320 channels, channel_mult 1-2-4-4, context 768, 77 tokens;
~860M parameters) at a 32x32 latent (256 px) to keep it feasible on 2 shared CPU cores.
The variants (plain CFG, DNG patch, DNG guider) are interleaved in one process, repeated, and the median
per-step time is compared; the DNG step evaluates positive, negative and concept in one batched call, so
the expected ratio is about 3/2 of the network time plus the (small) tracker cost.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from . import comfy_host as host

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def dng_kwargs():
    return dict(scale=5.0, prior=0.01, temperature=0.2, offset=0.002, p_max=0.9, p_min=1e-6,
                start_percent=0.0, end_percent=1.0, mode="dynamic")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(nodes, dng_nodes, custom, model, tokens, dim, latent_size, batch, steps, repeats):
    import comfy.samplers
    pos, neg, concept = (host.conditioning(seed, tokens, dim) for seed in (1, 2, 3))
    latent = {"samples": __import__("torch").zeros(batch, 4, latent_size, latent_size)}
    patched, _ = dng_nodes.DynamicNegativeGuidance().apply(model, concept=concept, **dng_kwargs())
    guider, _ = dng_nodes.DynamicNegativeGuiderNode().get_guider(model, pos, neg, 7.0, concept=concept, **dng_kwargs())
    sigmas = comfy.samplers.KSampler(model, steps, "cpu", sampler="euler", scheduler="normal").sigmas

    def plain():
        nodes.KSampler().sample(model, 0, steps, 7.0, "euler", "normal", pos, neg, latent)

    def dng_patch():
        nodes.KSampler().sample(patched, 0, steps, 7.0, "euler", "normal", pos, neg, latent)

    def dng_guider():
        custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(0), guider,
                                              comfy.samplers.sampler_object("euler"), sigmas, latent)

    variants = {"plain CFG": plain, "DNG patch": dng_patch, "DNG guider": dng_guider}
    for fn in variants.values():  # warm-up (model load, allocator)
        fn()
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(timed(fn) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def bar_png(results, path):
    """Small bar chart with PIL (ComfyUI's Python has no matplotlib)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (640, 80 + 90 * len(results)), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "DNG step time / plain CFG step time (median, euler, CPU)", fill="black")
    colours = {"DNG patch": (70, 110, 200), "DNG guider": (220, 130, 50)}
    y = 40
    for name, res in results.items():
        d.text((10, y), name, fill="black")
        for k, colour in colours.items():
            ratio = res[k] / res["plain CFG"]
            y += 22
            d.rectangle([150, y, 150 + int(240 * ratio), y + 16], fill=colour)
            d.text((155 + int(240 * ratio), y + 2), f"{k}: {ratio:.2f}", fill="black")
        d.line([150 + 240 * 1.5, 40, 150 + 240 * 1.5, y + 20], fill=(200, 0, 0))
        y += 46
    d.text((150 + 360 - 30, y - 16), "target 1.5", fill=(200, 0, 0))
    img.save(path)


def main():
    if host.comfy_path() is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout and run with ComfyUI's Python")
    import torch
    torch.set_num_threads(2)
    nodes = host.boot_comfy()
    dng_nodes = host.pack_submodule("nodes.dng_nodes")
    import comfy_extras.nodes_custom_sampler as custom
    cases = {  # model config, tokens, context width, latent size, batch, steps, repeats
        "tiny (32 ch, latent 4x4)": (host.tiny_unet_config(), 8, host.CONTEXT_DIM, 32 // 8, 2, 10, 7),
        "SD1.5-shaped (320 ch, latent 32x32)": (host.sd15_unet_config(), 77, 768, 32, 1, 2, 3),
    }
    only = os.environ.get("DNG_BENCH_ONLY")
    results = {}
    for name, (config, tokens, dim, size, batch, steps, repeats) in cases.items():
        if only and only not in name:
            continue
        model = host.random_model(unet_config=config)  # built only for the cases that run (SD1.5: 3.4 GB)
        t0 = time.time()
        results[name] = measure(nodes, dng_nodes, custom, model, tokens, dim, size, batch, steps, repeats)
        print(f"{name}: batch {batch}, {steps} steps x {repeats} repeats ({time.time() - t0:.0f} s)", flush=True)
    print("| model | plain CFG s/step | DNG patch s/step | ratio | DNG guider s/step | ratio |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['plain CFG']:.4f} | {r['DNG patch']:.4f} | {r['DNG patch'] / r['plain CFG']:.3f} | "
              f"{r['DNG guider']:.4f} | {r['DNG guider'] / r['plain CFG']:.3f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "dng_step_time.json"  # cases run separately (DNG_BENCH_ONLY) are merged for the plot
    merged = json.loads(store.read_text()) if store.exists() and only else {}
    merged.update(results)
    store.write_text(json.dumps(merged, indent=1))
    path = RESULTS / "dng_step_time.png"
    bar_png(merged, path)
    print(f"plot: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
