"""The test command for any OS: ``python run_tests.py [pytest args]`` (Windows equivalent of ``bash tests/run.sh``).

Makes ``.venv`` with torch 2.13.0 (CPU wheel: a local one if pip finds it, else the PyTorch CPU index;
``SHIELDED_TORCH_INDEX`` overrides it), the requirements and pytest; runs the front-end lint and unit tests when
npm is installed; then the unit tests. Real-ComfyUI integration tests run when ``COMFYUI_PATH`` points at a ComfyUI
checkout and are reported as skipped otherwise (run them with ComfyUI's own Python, see README "Tests").
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def run(*cmd, **kw) -> int:
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)


def main(args: list[str]) -> int:
    folder = ROOT / os.environ.get("SHIELDED_TEST_VENV", ".venv")
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        venv.create(folder, with_pip=True)
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    has_torch = run(python, "-c", "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')",
                    stderr=subprocess.DEVNULL) == 0
    if not has_torch:
        # A local CPU wheel (pip's find-links) if there is one, its small deps from the index; else the CPU index.
        if run(*pip, "--no-index", "--no-deps", "torch==2.13.0", stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL) == 0:
            failed = run(*pip, "torch==2.13.0")
        else:
            index = os.environ.get("SHIELDED_TORCH_INDEX", CPU_INDEX)
            failed = run(*pip, "torch==2.13.0", "--index-url", index, "--extra-index-url", "https://pypi.org/simple")
        if failed:
            return 1
    if run(*pip, "-r", "requirements.txt", "-r", "tests/requirements.txt"):
        return 1
    npm = shutil.which("npm")
    if npm:
        for cmd in (["ci", "--prefix", "tests/ui", "--no-audit", "--no-fund", "--loglevel=error"],
                    ["--prefix", "tests/ui", "run", "--silent", "lint"], ["--prefix", "tests/ui", "test", "--silent"]):
            if run(npm, *cmd):
                return 1
    else:
        print("npm not found: front-end lint and unit tests skipped")
    return run(python, "-m", "pytest", "tests", *args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
