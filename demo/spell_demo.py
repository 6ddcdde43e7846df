"""SPELL demo: the terrain consistency model with and without sparse repellency, from the same seeds.

Run ``bash demo/run.sh`` (fresh venv) or, with the deps installed, ``python -m demo`` from the repo root.
Writes into ``demo_output/`` at the repo root: ``spell_grid.png`` (shields; batch without SPELL; batch with SPELL, the
samples SPELL corrected framed in orange as in the paper's Fig. 6), ``spell_activity.png`` (share of
trajectories corrected per step and correction size relative to the score, the paper's Fig. 5) and
``spell_report.txt``.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from benchmarks.terrain_model import CONSISTENCY_SIGMAS, TerrainDenoiser, render, unavailable_reason
from guidance.metrics import median_pairwise_distance, pairwise_distances
from guidance.sampling import SpellWrapper, sample

LOG = logging.getLogger("shielded_sampling.demo")

ORANGE = (255, 140, 0)
TILE, PAD, LABEL_W = 128, 8, 150


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                     # Pillow < 10.1
        return ImageFont.load_default()


def noise_for(seed: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, 128, 128, generator=torch.Generator().manual_seed(seed))


def run(model, seed: int, batch: int, wrapper=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return sample(wrapper or model, noise_for(seed, batch), CONSISTENCY_SIGMAS, sampler="consistency",
                  generator=gen)


def nearest_other(x: torch.Tensor, shields: torch.Tensor) -> torch.Tensor:
    """Per sample: L2 distance to the nearest other sample of the batch or shield."""
    allx = torch.cat([x, shields])
    d = pairwise_distances(allx)[: len(x)]
    d[torch.arange(len(x)), torch.arange(len(x))] = float("inf")
    return d.min(1).values


def tile_row(images: np.ndarray, label: str, framed=None, captions=None) -> Image.Image:
    n = len(images)
    row = Image.new("RGB", (LABEL_W + n * (TILE + PAD) + PAD, TILE + 2 * PAD + 18), "white")
    draw = ImageDraw.Draw(row)
    draw.text((8, TILE // 2), label, fill="black", font=font(15))
    for i, img in enumerate(images):
        x0 = LABEL_W + PAD + i * (TILE + PAD)
        if framed is not None and framed[i]:
            draw.rectangle([x0 - 5, PAD - 5, x0 + TILE + 4, PAD + TILE + 4], fill=ORANGE)
        row.paste(Image.fromarray(img), (x0, PAD))
        if captions:
            draw.text((x0 + 2, PAD + TILE + 5), captions[i], fill="black", font=font(11))
    return row


def draw_grid(shields, plain, spelled, corrected, d_plain, d_spell, radius, path: Path):
    moved = (spelled - plain).flatten(1).norm(dim=1).tolist()
    rows = [tile_row(render(shields), "shields\n(earlier run)"),
            tile_row(render(plain), "without SPELL", captions=[f"nearest {d:.0f}" for d in d_plain]),
            tile_row(render(spelled), "with SPELL", framed=corrected.tolist(),
                     captions=[f"nearest {d:.0f}, moved {m:.0f}" for d, m in zip(d_spell, moved)])]
    width = max(r.width for r in rows)
    title_h = 52
    grid = Image.new("RGB", (width, title_h + sum(r.height for r in rows)), "white")
    ImageDraw.Draw(grid).text(
        (8, 8), f"Terrain consistency model, same seeds. SPELL (intra-batch + shields, r = {radius:.0f}): "
                f"orange = SPELL intervened.\n'nearest' = L2 distance to the closest peer or shield; 'moved' = L2 "
                f"distance to the same seed without SPELL.",
        fill="black", font=font(14))
    y = title_h
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    grid.save(path)


def draw_activity(wrapper: SpellWrapper, path: Path):
    """Bar chart per step: share of trajectories corrected (orange) and mean relative magnitude (blue)."""
    run_rec = wrapper.runs[-1]
    active = run_rec.active_matrix().float().mean(1).tolist()
    rel = run_rec.relative_matrix()
    rel_mean = [float(r[a].mean()) if a.any() else 0.0 for r, a in zip(rel, run_rec.active_matrix())]
    rel_top = max(max(rel_mean), 1e-12)
    sigmas = [s.sigma for s in run_rec.steps]
    act = run_rec.active_matrix()
    cell = 16
    w, h, left, bottom, top = 900, 330, 70, 60, 50
    img = Image.new("RGB", (w, h + 40 + cell * act.shape[1]), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "SPELL activity per denoising step (paper Fig. 5)", fill="black", font=font(16))
    plot_h = h - bottom - top
    d.line([left, top, left, h - bottom, w - 20, h - bottom], fill="black")
    for frac in (0, 0.5, 1.0):
        y = h - bottom - frac * plot_h
        d.line([left - 4, y, left, y], fill="black")
        d.text((left - 40, y - 7), f"{frac:.1f}", fill="black", font=font(12))
    n = len(sigmas)
    slot = (w - 20 - left) / n
    for i, (a, r, s) in enumerate(zip(active, rel_mean, sigmas)):
        x = left + i * slot
        d.rectangle([x + 0.15 * slot, h - bottom - a * plot_h, x + 0.48 * slot, h - bottom], fill=ORANGE)
        d.rectangle([x + 0.52 * slot, h - bottom - r / rel_top * plot_h, x + 0.85 * slot, h - bottom],
                    fill=(60, 110, 200))
        d.text((x + 0.2 * slot, h - bottom - a * plot_h - 16), f"{a:.2f}", fill=ORANGE, font=font(11))
        d.text((x + 0.5 * slot, h - bottom - r / rel_top * plot_h - 16), f"{100 * r:.2f}%", fill=(60, 110, 200),
               font=font(11))
        d.text((x + 0.2 * slot, h - bottom + 6), f"sigma {s:.0f}", fill="black", font=font(12))
    y0 = h + 30
    d.text((10, y0 - 24), "per sample (rows) and step (columns): orange = corrected", fill="black", font=font(13))
    for b in range(act.shape[1]):
        d.text((left - 60, y0 + b * cell), f"sample {b + 1}", fill="black", font=font(11))
        for i in range(act.shape[0]):
            x = left + i * slot + 0.15 * slot
            d.rectangle([x, y0 + b * cell + 1, x + 0.7 * slot, y0 + (b + 1) * cell - 2],
                        fill=ORANGE if act[i, b] else (225, 225, 225))
    d.text((left, h - 28), "orange: share of trajectories corrected (axis)   blue: mean ||correction|| / "
                           "||x - x0_hat|| of corrected ones (% labels, bars scaled to the largest)", fill="black", font=font(12))
    img.save(path)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="samples per batch")
    ap.add_argument("--seed", type=int, default=7, help="seed of the compared batch")
    ap.add_argument("--shields", type=int, default=4, help="outputs of an earlier unguided run used as shields")
    ap.add_argument("--radius-factor", type=float, default=0.6,
                    help="radius as a multiple of the median pairwise distance of the unguided batch")
    ap.add_argument("--overcompensation", type=float, default=1.6, help="lambda of eq. 5 (1.6: the paper's LDM/SD3 value)")
    ap.add_argument("--difficulty", type=int, default=60, help="terrain difficulty label 1..100")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "demo_output",
                    help="output folder")
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"demo: the terrain model is not available: {reason}")
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = TerrainDenoiser(difficulty=args.difficulty)
    shields = run(model, args.seed + 1000, args.shields)
    t1 = time.perf_counter()
    plain = run(model, args.seed, args.batch)
    t_plain = time.perf_counter() - t1
    radius = args.radius_factor * median_pairwise_distance(plain)
    wrapper = SpellWrapper(model, radius, shields=shields, intra_batch=True, overcompensation=args.overcompensation)
    t1 = time.perf_counter()
    spelled = run(model, args.seed, args.batch, wrapper)
    t_spell = time.perf_counter() - t1
    corrected = wrapper.runs[-1].corrected_samples()
    d_plain, d_spell = nearest_other(plain, shields), nearest_other(spelled, shields)
    draw_grid(shields, plain, spelled, corrected, d_plain.tolist(), d_spell.tolist(), radius,
              args.out / "spell_grid.png")
    draw_activity(wrapper, args.out / "spell_activity.png")
    report = report_text(args, radius, corrected, d_plain, d_spell, wrapper, t_plain, t_spell,
                         time.perf_counter() - t0)
    (args.out / "spell_report.txt").write_text(report)
    LOG.info("%s", report)
    LOG.info("Wrote %s\n      %s\n      %s", args.out / "spell_grid.png", args.out / "spell_activity.png",
             args.out / "spell_report.txt")
    return 0


def report_text(args, radius, corrected, d_plain, d_spell, wrapper, t_plain, t_spell, total) -> str:
    act = wrapper.runs[-1].active_matrix()
    lines = [
        "SPELL demo: terrain consistency UNet (adaptive-terrain-diffusion 0.4.2), "
        f"{len(CONSISTENCY_SIGMAS) - 1} consistency steps, sigmas {CONSISTENCY_SIGMAS[:-1].tolist()}",
        f"batch {args.batch}, seed {args.seed}, difficulty {args.difficulty}, {args.shields} shields from an earlier "
        f"unguided run, intra-batch on, radius {radius:.1f} ({args.radius_factor} x median pairwise distance), "
        f"overcompensation {args.overcompensation}",
        f"corrected samples: {int(corrected.sum())}/{len(corrected)} (orange in the grid); others are identical "
        "to the run without SPELL",
        f"closer than r to a peer or shield: without SPELL {int((d_plain < radius).sum())}/{len(d_plain)}, "
        f"with SPELL {int((d_spell < radius * (1 - 1e-4)).sum())}/{len(d_spell)}",
        f"min distance to a peer or shield: without {float(d_plain.min()):.1f}, with {float(d_spell.min()):.1f}",
        "share of trajectories corrected per step: " + ", ".join(f"{v:.2f}" for v in act.float().mean(1).tolist()),
        f"time: without SPELL {t_plain:.1f} s, with SPELL {t_spell:.1f} s, total {total:.1f} s",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
