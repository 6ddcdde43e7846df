"""Draws docs/icon.png (256 x 256), the registry icon: a shield with samples repelled from its rim.

Run from the repository root with any Python that has Pillow: ``python docs/make_icon.py``.
"""
import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE, SCALE = 256, 4                     # drawn at 4x, then downsampled (anti-aliasing)


def main():
    s = SIZE * SCALE
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([0, 0, s - 1, s - 1], radius=48 * SCALE, fill=(24, 34, 52, 255))
    c, r = s / 2, 62 * SCALE
    d.ellipse([c - r * 1.55, c - r * 1.55, c + r * 1.55, c + r * 1.55], outline=(255, 140, 0, 255),
              width=5 * SCALE)
    shield = [(c, c - r), (c + 0.85 * r, c - 0.65 * r), (c + 0.75 * r, c + 0.35 * r), (c, c + r),
              (c - 0.75 * r, c + 0.35 * r), (c - 0.85 * r, c - 0.65 * r)]
    d.polygon(shield, fill=(70, 160, 90, 255))
    for k in range(7):                    # samples pushed onto the repellency sphere
        a = 2 * math.pi * k / 7 - math.pi / 2 + 0.3
        x, y = c + 1.55 * r * math.cos(a), c + 1.55 * r * math.sin(a)
        e = 13 * SCALE
        d.ellipse([x - e, y - e, x + e, y + e], fill=(245, 245, 245, 255))
    img.resize((SIZE, SIZE), Image.LANCZOS).save(Path(__file__).with_name("icon.png"), optimize=True)


if __name__ == "__main__":
    main()
