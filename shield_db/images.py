"""Read an image file once (regular files only, bounded), decode it to 8-bit RGB at a target size, or say clearly
why it cannot be used."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
RESIZE_MODES = ("center-crop", "pad", "stretch")
# Larger images are skipped (decompression bombs). PIL's default, i.e. what ComfyUI's Load Image opens; enforced
# here too, so a host or pack that lifts PIL's global limit does not lift this one.
MAX_PIXELS = 89_478_485
MAX_FILE_BYTES = 1 << 30  # larger files are skipped unread
READ_CHUNK_BYTES = 8 * 1024 * 1024
READ_ATTEMPTS = 3
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class UnusableImage(ValueError):
    """The file cannot be decoded to an image; the message says why."""


class FileChanged(UnusableImage):
    """The file changed while it was read (tried again next run)."""


@dataclass(frozen=True)
class FileRead:
    """One read of a file: its sha256, and its bytes, size and mtime as of that read."""
    sha256: str
    size: int
    mtime_ns: int
    data: bytes | None = None


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))  # a FIFO swapped in cannot block open


def _version(st: os.stat_result) -> tuple:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read_once(path: Path, keep: bool, max_bytes: int) -> FileRead:
    """Hash (and keep) the bytes of the regular file ``path``; never opens anything else, never reads past its size."""
    try:
        if not stat.S_ISREG(os.stat(path, follow_symlinks=False).st_mode):
            raise UnusableImage("not a regular file")
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise UnusableImage(f"unreadable: {type(exc).__name__}: {exc}") from None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise UnusableImage("not a regular file")
        if before.st_size > max_bytes:
            raise UnusableImage(f"too large: {before.st_size} bytes, more than {max_bytes}")
        digest, chunks, total = hashlib.sha256(), [], 0
        while chunk := os.read(fd, min(READ_CHUNK_BYTES, before.st_size + 1 - total)):
            total += len(chunk)
            if total > before.st_size:
                raise FileChanged("changed while being read (it grew)")
            digest.update(chunk)
            if keep:
                chunks.append(chunk)
        if total != before.st_size or _version(os.fstat(fd)) != _version(before):
            raise FileChanged("changed while being read")
    except OSError as exc:
        raise UnusableImage(f"unreadable: {type(exc).__name__}: {exc}") from None
    finally:
        os.close(fd)
    return FileRead(digest.hexdigest(), before.st_size, before.st_mtime_ns, b"".join(chunks) if keep else None)


def read_file(path: Path, keep: bool = True, max_bytes: int = MAX_FILE_BYTES) -> FileRead:
    """Read ``path`` once: sha256, bytes (``keep``) and size/mtime all of that one read; retried if it changes."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return _read_once(Path(path), keep, max_bytes)
        except FileChanged:
            if attempt == READ_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


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


def open_rgb(data: bytes, target: tuple[int, int] | None = None) -> Image.Image:
    """Decode the bytes of an image file fully as RGB, or raise :class:`UnusableImage` with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise UnusableImage(f"too large: {img.width}x{img.height} = {img.width * img.height:,} pixels, "
                                        f"more than {MAX_PIXELS:,}")
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


def decode_for_encode(data: bytes, width: int, height: int, mode: str) -> np.ndarray:
    """``uint8 [height, width, 3]`` ready for a VAE (divide by 255) from the bytes of an image file."""
    return np.asarray(fit(open_rgb(data, (width, height)), width, height, mode), dtype=np.uint8)


def load_for_encode(path: Path, width: int, height: int, mode: str) -> np.ndarray:
    """:func:`decode_for_encode` of one bounded read of the regular file ``path``."""
    return decode_for_encode(read_file(path).data, width, height, mode)


def thumbnail(rgb: np.ndarray, size: int) -> np.ndarray:
    """Square ``uint8 [size, size, 3]`` preview (center-cropped)."""
    return np.asarray(ImageOps.fit(Image.fromarray(rgb), (size, size), Image.LANCZOS), dtype=np.uint8)
