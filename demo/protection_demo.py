"""Protection demo: a model that memorises MNIST, half of its training images protected, with and without SPELL.

The model is the exact denoiser of its training set (``evaluation.empirical``): every sample it draws ends on a
training image, so without SPELL about half the outputs are copies of protected images. SPELL, with the protected
half as shields, pushes every prediction that comes within the radius of a protected image back out; the model then
lands on an unprotected training image or somewhere new. Same seeds in both rows.

Settings (BENCHMARKS.md, "Protection"): 20 Euler steps on EDM sigmas [0.002, 80]; radius 4 (L2 over 784 pixels in
[-1, 1], i.e. 0.143 in the nodes' per-element units), doubled for sigma in [0.5, 5] so SPELL acts earlier, and
overcompensation 4: the benchmark's setting with the most outputs on an unprotected image (89%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from demo.drawing import GREEN, RED, GREY, font, framed_tile
from evaluation.empirical import EmpiricalDenoiser
from guidance.sampling import SpellWrapper, karras_sigmas, sample
from guidance.shields import TensorShields

PIXELS = 28 * 28
COPY_L2 = 1.0                      # L2 over 784 pixels below which an output is a copy of that image
RADIUS_L2 = 4.0


@dataclass
class Outcome:
    """Per output: nearest protected / unprotected training image and the distances (L2, 784 pixels)."""
    d_protected: torch.Tensor
    i_protected: torch.Tensor
    d_free: torch.Tensor
    i_free: torch.Tensor

    def copies_protected(self) -> torch.Tensor:
        return self.d_protected < COPY_L2

    def copies_free(self) -> torch.Tensor:
        return (self.d_free < COPY_L2) & ~self.copies_protected()

    def inside_shield(self) -> torch.Tensor:
        return self.d_protected < RADIUS_L2


def radius_schedule(sigma: float) -> float:
    """Radius 4, doubled for sigma in [0.5, 5] (intervene before the memorising model has committed)."""
    return 2 * RADIUS_L2 if 0.5 <= sigma <= 5.0 else RADIUS_L2


def split(data: torch.Tensor, seed: int):
    """A fixed random half of the training images is protected; returns (protected, unprotected)."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    half = len(data) // 2
    return data[perm[:half]], data[perm[half:]]


def outcome(out: torch.Tensor, protected: TensorShields, free: TensorShields) -> Outcome:
    d_p, i_p = protected.nearest(out)
    d_f, i_f = free.nearest(out)
    return Outcome(d_p, i_p, d_f, i_f)


def run_protection(data: torch.Tensor, samples: int, steps: int, seed: int):
    """(protected, free, plain outputs, SPELL outputs, wrapper, plain outcome, SPELL outcome)."""
    protected, free = split(data, seed)
    model = EmpiricalDenoiser(data)
    sigmas = karras_sigmas(steps, 0.002, 80.0)
    noise = torch.randn(samples, 1, 28, 28, generator=torch.Generator().manual_seed(seed + 1))
    plain = sample(model, noise, sigmas, sampler="euler")
    shields = TensorShields(protected)
    wrapper = SpellWrapper(model, radius_schedule, shields=shields, overcompensation=4.0)
    spelled = sample(wrapper, noise, sigmas, sampler="euler")
    free_shields = TensorShields(free)
    return (protected, free, plain, spelled, wrapper,
            outcome(plain, shields, free_shields), outcome(spelled, shields, free_shields))


def digit(x: torch.Tensor, size: int) -> Image.Image:
    arr = ((x.reshape(28, 28).clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB").resize((size, size), Image.NEAREST)


def per_element(d: float) -> float:
    return d / math.sqrt(PIXELS)


def draw_protection(protected, free, plain, spelled, res_plain: Outcome, res_spell: Outcome, show: int, path,
                    n_data: int):
    """Four rows: output without SPELL, the training image it copies, output with SPELL, what that one is."""
    tile, gap, label_w, cap_h = 64, 14, 170, 30
    n = min(show, len(plain))
    col_w = tile + gap
    rows = ["without SPELL", "its nearest\ntraining image", "with SPELL\n(same seed)", "its nearest\ntraining image"]
    row_h = tile + cap_h + 10
    title_h = 88
    img = Image.new("RGB", (label_w + n * col_w + gap, title_h + len(rows) * row_h + 36), "white")
    d = ImageDraw.Draw(img)
    pct = lambda m: f"{100 * m.float().mean().item():.0f}%"          # noqa: E731
    d.text((10, 8), f"Protection: a model that memorises {n_data:,} MNIST digits, a random half of them protected "
                    f"(SPELL shields). Counts over {len(plain)} seeds, the first {n} shown.", fill="black",
           font=font(15))
    d.text((10, 30), f"Copies of protected images: {pct(res_plain.copies_protected())} without SPELL -> "
                     f"{pct(res_spell.copies_protected())} with SPELL.   Inside a shield (radius 4 = 0.14 per "
                     f"element): {pct(res_plain.inside_shield())} -> {pct(res_spell.inside_shield())}.",
           fill="black", font=font(14))
    d.text((10, 52), f"With SPELL: {pct(res_spell.copies_free())} copy an unprotected image, the rest copy no "
                     f"training image. Red = protected image / its copy; green = unprotected; grey = no copy.",
           fill="black", font=font(13))
    for r, name in enumerate(rows):
        d.text((10, title_h + r * row_h + tile // 3), name, fill="black", font=font(14))
    for k in range(n):
        x = label_w + k * col_w
        d.text((x + tile // 2 - 8, title_h - 18), f"#{k + 1}", fill="black", font=font(13))
        for r, (out, res) in enumerate(((plain, res_plain), (spelled, res_spell))):
            y_out = title_h + 2 * r * row_h
            y_ref = y_out + row_h
            near_protected = res.d_protected[k] <= res.d_free[k]
            dist = float(min(res.d_protected[k], res.d_free[k]))
            copy = dist < COPY_L2
            colour = (RED if near_protected else GREEN) if copy else GREY
            ref = protected[res.i_protected[k]] if near_protected else free[res.i_free[k]]
            framed_tile(img, digit(out[k], tile), x, y_out, colour)
            framed_tile(img, digit(ref, tile), x, y_ref, RED if near_protected else GREEN)
            what = ("copy" if copy else "no copy") + (" of prot." if near_protected and copy else "")
            d.text((x - 4, y_out + tile + 6), what, fill=colour, font=font(11))
            d.text((x - 4, y_ref + tile + 6), f"d {per_element(dist):.3f}", fill="black", font=font(11))
    d.text((10, img.height - 26), "d = distance output -> that training image, RMS per pixel in [-1, 1] "
                                  "(the SPELL nodes' radius unit). Copy: d < 0.036 (L2 < 1).",
           fill="black", font=font(12))
    img.save(path)


def report_lines(n_data: int, samples: int, steps: int, res_plain: Outcome, res_spell: Outcome, seconds: float) -> list:
    pct = lambda m: f"{int(m.sum())}/{len(m)} ({100 * m.float().mean().item():.0f}%)"   # noqa: E731
    return [
        f"Protection (MNIST, exact denoiser of {n_data:,} training images, half protected; {samples} seeds, {steps} "
        f"Euler steps, radius 4 L2 = {per_element(RADIUS_L2):.3f} per element, 2x for sigma in [0.5, 5], "
        f"overcompensation 4):",
        f"  copies of protected images: without SPELL {pct(res_plain.copies_protected())}, "
        f"with SPELL {pct(res_spell.copies_protected())}",
        f"  inside a shield (closer than the radius): without {pct(res_plain.inside_shield())}, "
        f"with {pct(res_spell.inside_shield())}",
        f"  with SPELL, copies of unprotected images {pct(res_spell.copies_free())}, no copy "
        f"{pct(~res_spell.copies_free() & ~res_spell.copies_protected())} (pushed off every training image)",
        f"  time {seconds:.1f} s",
    ]
