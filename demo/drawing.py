"""Small Pillow helpers shared by the demo figures."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

ORANGE = (255, 140, 0)
RED = (210, 40, 40)
GREEN = (40, 150, 60)
GREY = (150, 150, 150)
FRAME = 3


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                     # Pillow < 10.1
        return ImageFont.load_default()


def framed_tile(canvas: Image.Image, tile: Image.Image, x: int, y: int, colour=None):
    """Paste ``tile`` at (x, y) with a FRAME-pixel border outside it (``colour`` None: no border)."""
    if colour is not None:
        ImageDraw.Draw(canvas).rectangle([x - FRAME, y - FRAME, x + tile.width + FRAME - 1,
                                          y + tile.height + FRAME - 1], fill=colour)
    canvas.paste(tile, (x, y))
