"""The pretrained terrain consistency UNet of ``adaptive-terrain-diffusion`` 0.4.2 as a denoiser, plus a renderer.

Install (no torch is pulled; the ONNX model is inside the wheel)::

    pip install --no-deps adaptive-terrain-diffusion==0.4.2
    pip install onnxruntime            # with its small deps: numpy, flatbuffers, protobuf, packaging

The package's model (``terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx``) is an
EDM-parameterised consistency UNet distilled for one step: inputs ``noisy [B,1,128,128]``, ``sigma [B]``,
``difficulty [B]`` (label ``(d - 1) / 99`` for a difficulty ``d`` in 1..100), output ``denoised`` in model
space ``[-1, 1]`` (asinh-compressed height). ``sigma_min = 0.002``, ``sigma_max = 80``, ``sigma_data = 0.5``.
:class:`TerrainDenoiser` is the ``model(x, sigma) -> denoised`` callable the samplers of
``guidance.sampling`` expect; use it with ``sample_consistency`` and :data:`CONSISTENCY_SIGMAS`.

The package's own renderer is a Matplotlib 3-D surface (slow: ~1 s per terrain); :func:`render` is a
fast hill-shaded colour map of the same heights (numpy only) for grids.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 0.5
NATIVE_SIZE = 128
HEIGHT_RANGE = 22.16864013671875     # metres, from terrain_diffusion.TerrainGenerator
ASINH_SCALE = 0.1
# Multistep consistency schedule of the demo and benchmarks. The model is endpoint-distilled: below sigma ~20 it
# leaves visible noise in its output, so every step stays at high sigma (final texture close to the one-step sample).
CONSISTENCY_SIGMAS = torch.tensor([80.0, 64.0, 51.0, 41.0, 33.0, 26.0, 0.0])
INSTALL_HINT = "pip install --no-deps adaptive-terrain-diffusion==0.4.2 && pip install onnxruntime"


def model_file() -> Path:
    """Path of the ONNX model inside the installed wheel (FileNotFoundError with the install command if absent)."""
    spec = importlib.util.find_spec("terrain_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"adaptive-terrain-diffusion is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "terrain_consistency_unet_difficulty100.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"terrain model missing at {path}: reinstall with {INSTALL_HINT}")
    return path


def unavailable_reason() -> Union[str, None]:
    """``None`` if the terrain model can run here, else why not (for skips)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return f"onnxruntime is not installed ({INSTALL_HINT})"
    try:
        model_file()
    except FileNotFoundError as err:
        return str(err)
    return None


def difficulty_labels(difficulty: Union[int, Sequence[int]], batch: int) -> np.ndarray:
    """Model labels ``(d - 1) / 99`` for integer difficulties 1..100 (one, or one per sample)."""
    d = np.broadcast_to(np.asarray(difficulty, dtype=np.float64), (batch,))
    if ((d < 1) | (d > 100) | (d != np.floor(d))).any():
        raise ValueError(f"difficulty must be whole numbers in 1..100, got {d.tolist()}")
    return ((d - 1) / 99).astype(np.float32)


class TerrainDenoiser:
    """``model(x [B,1,128,128], sigma [B]) -> denoised`` over the bundled ONNX consistency UNet (CPU)."""

    sigma_min, sigma_max, sigma_data = SIGMA_MIN, SIGMA_MAX, SIGMA_DATA

    def __init__(self, difficulty: Union[int, Sequence[int]] = 50, threads: Union[int, None] = None):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_file()), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.difficulty = difficulty
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (1, NATIVE_SIZE, NATIVE_SIZE):
            raise ValueError(f"terrain model takes x of shape [B, 1, 128, 128], got {tuple(x.shape)}")
        b = x.shape[0]
        feeds = {
            "noisy": np.ascontiguousarray(x.detach().float().cpu().numpy()),
            "sigma": np.ascontiguousarray(np.broadcast_to(sigma.detach().float().cpu().numpy(), (b,))),
            "difficulty": difficulty_labels(self.difficulty, b),
        }
        self.calls += 1
        out = self.session.run(["denoised"], feeds)[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device, x.dtype)


def to_heights(x: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """Model space ``[-1, 1]`` to heights in metres ``[B, H, W]`` (the package's inverse asinh map, floor at 0)."""
    v = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    v = v.reshape(v.shape[0], *v.shape[-2:]).astype(np.float32)
    unit = np.clip((v + 1.0) * 0.5, 0.0, 1.0)
    h = ASINH_SCALE * np.sinh(unit * np.arcsinh(HEIGHT_RANGE / ASINH_SCALE))
    h = np.clip(h, 0.0, HEIGHT_RANGE)
    return h - h.min(axis=(-2, -1), keepdims=True)


# Elevation colour stops (fraction of the range, RGB), close to Matplotlib's "terrain" map.
_STOPS = np.array([0.0, 0.15, 0.35, 0.6, 0.85, 1.0], dtype=np.float32)
_COLOURS = np.array([[40, 110, 170], [70, 160, 90], [150, 190, 100], [200, 175, 120],
                     [150, 120, 95], [245, 245, 245]], dtype=np.float32)


def render(x: Union[torch.Tensor, np.ndarray], vmax: Union[float, None] = None) -> np.ndarray:
    """Hill-shaded colour rendering ``[B, H, W, 3]`` uint8 of model-space terrains (light from the north-west).

    Colours span ``[0, vmax]`` metres, or each terrain's own height range when ``vmax`` is None.
    """
    h = to_heights(x)
    top = np.full((len(h), 1, 1), float(vmax)) if vmax else np.maximum(h.max(axis=(1, 2), keepdims=True), 1e-6)
    frac = np.clip(h / top, 0, 1)
    colour = np.stack([np.interp(frac, _STOPS, _COLOURS[:, c]) for c in range(3)], -1)
    gy, gx = np.gradient(h, axis=(-2, -1))
    nx, ny, nz = -gx * 4, -gy * 4, np.ones_like(h)
    norm = np.sqrt(nx * nx + ny * ny + nz * nz)
    light = np.array([-1.0, -1.0, 1.4]) / np.linalg.norm([-1.0, -1.0, 1.4])
    shade = np.clip((nx * light[0] + ny * light[1] + nz * light[2]) / norm, 0, 1)
    out = colour * (0.35 + 0.75 * shade[..., None])
    return np.clip(out, 0, 255).astype(np.uint8)
