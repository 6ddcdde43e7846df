"""One-command demo, any OS: ``python demo/run.py [options]`` (what ``bash demo/run.sh`` does, for Windows too).

Makes ``.venv-demo`` in the clone, installs torch 2.13.0 (CPU wheel: a local one if pip finds it, else the PyTorch
CPU index, ``SHIELDED_TORCH_INDEX`` to override), numpy, pillow, onnxruntime and adaptive-terrain-diffusion 0.4.2
(``--no-deps``: its metadata asks for onnxruntime-gpu; the CPU runtime is enough), then runs ``python -m demo``
inside it. Options are passed on (``python demo/run.py --help``).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-demo"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LOG = logging.getLogger("shielded_sampling.demo")
BANNER = ("[demo] running (~1 min of CPU time, installs included; measured 3 min 18 s wall clock for the whole command "
          "in a fresh clone on 2 cores shared with ~16 busy processes: README 'Demo')")


def venv_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def pip(python: Path, *args: str) -> int:
    return subprocess.call([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args])


def ensure_torch(python: Path):
    """torch 2.13.0 CPU: a local wheel if pip's find-links has one (its deps from the index), else the CPU index."""
    check = "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"
    if subprocess.call([str(python), "-c", check], stderr=subprocess.DEVNULL) == 0:
        return
    LOG.info("[demo] installing torch 2.13.0 (CPU)")
    local = subprocess.call([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             "--no-index", "--no-deps", "torch==2.13.0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0
    if local:
        failed = pip(python, "torch==2.13.0")                 # torch is there: only its small deps are fetched
    else:
        index = os.environ.get("SHIELDED_TORCH_INDEX", CPU_INDEX)
        failed = pip(python, "torch==2.13.0", "--index-url", index, "--extra-index-url", "https://pypi.org/simple")
    if failed:
        raise SystemExit("could not install torch==2.13.0 (set SHIELDED_TORCH_INDEX to a reachable index)")


def main(argv: list[str]) -> int:
    python = venv_python(VENV)
    if not python.exists():
        LOG.info("[demo] creating %s", VENV.name)
        venv.create(VENV, with_pip=True)
    ensure_torch(python)
    LOG.info("[demo] installing numpy, pillow, onnxruntime, adaptive-terrain-diffusion 0.4.2")
    if pip(python, "numpy", "pillow", "onnxruntime") or pip(python, "--no-deps", "adaptive-terrain-diffusion==0.4.2"):
        raise SystemExit("demo: installing the demo's packages failed")
    if "-h" not in argv and "--help" not in argv:
        LOG.info("%s", BANNER)
    return subprocess.call([str(python), "-m", "demo", *argv], cwd=ROOT)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main(sys.argv[1:]))
