"""Decode any image file to 8-bit RGB at a target size, or say clearly why it cannot be used."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
RESIZE_MODES = ("center-crop", "pad", "stretch")
MAX_PIXELS = 1 << 28  # 268 M pixels: larger files are skipped (decompression bombs)
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class UnusableImage(ValueError):
    """The file cannot be decoded to an image; the message says why."""


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16/32-bit grey rescaled, float clipped, CMYK/palette/grey converted,
    alpha dropped as ComfyUI's LoadImage does (the colour under transparent pixels is kept)."""
    if img.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "I" or arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_rgb(path: Path, target: tuple[int, int] | None = None) -> Image.Image:
    """Open ``path`` fully decoded as RGB, or raise :class:`UnusableImage` with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise UnusableImage(f"too large: {img.width}x{img.height} is more than {MAX_PIXELS} pixels")
                if target is not None and img.format == "JPEG":
                    img.draft("RGB", (target[0] * 2, target[1] * 2))  # decode huge JPEGs at reduced size
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb8(img)
    except UnusableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnusableImage(f"too large: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError, MemoryError) as exc:
        raise UnusableImage(f"cannot decode: {type(exc).__name__}: {exc}") from None


def fit(img: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """Resize to exactly ``width x height``: ``center-crop`` (cover then crop), ``pad`` (fit, black bars), ``stretch``."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mode == "stretch":
        return img.resize((width, height), Image.LANCZOS)
    if mode == "center-crop":
        return ImageOps.fit(img, (width, height), Image.LANCZOS)
    inner = ImageOps.contain(img, (width, height), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
    return canvas


def load_for_encode(path: Path, width: int, height: int, mode: str) -> np.ndarray:
    """``uint8 [height, width, 3]`` ready for a VAE (divide by 255)."""
    return np.asarray(fit(open_rgb(path, (width, height)), width, height, mode), dtype=np.uint8)


def thumbnail(rgb: np.ndarray, size: int) -> np.ndarray:
    """Square ``uint8 [size, size, 3]`` preview (center-cropped)."""
    return np.asarray(ImageOps.fit(Image.fromarray(rgb), (size, size), Image.LANCZOS), dtype=np.uint8)
