"""The test command for any OS: ``python run_tests.py [pytest args]`` (Windows equivalent of ``bash tests/run.sh``).

Makes ``.venv`` with torch 2.13.0 (CPU wheel: a local one if pip finds it, else the PyTorch CPU index;
``SHIELDED_TORCH_INDEX`` overrides it), the requirements and pytest; runs the front-end lint and unit tests when
npm is installed; then the unit tests. Real-ComfyUI integration tests run when ``COMFYUI_PATH`` points at a ComfyUI
checkout and are reported as skipped otherwise (run them with ComfyUI's own Python, see README "Tests").
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from demo.run import ensure_torch, venv_python   # one torch installer for both commands

ROOT = Path(__file__).resolve().parent
LOG = logging.getLogger("shielded_sampling.tests")


def run(*cmd, **kw) -> int:
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)


def main(args: list[str]) -> int:
    folder = ROOT / os.environ.get("SHIELDED_TEST_VENV", ".venv")
    python = venv_python(folder)
    if not python.exists():
        venv.create(folder, with_pip=True)
    ensure_torch(python)
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if run(*pip, "-r", "requirements.txt", "-r", "tests/requirements.txt"):
        return 1
    npm = shutil.which("npm")
    if npm:
        for cmd in (["ci", "--prefix", "tests/ui", "--no-audit", "--no-fund", "--loglevel=error"],
                    ["--prefix", "tests/ui", "run", "--silent", "lint"], ["--prefix", "tests/ui", "test", "--silent"]):
            if run(npm, *cmd):
                return 1
    else:
        LOG.info("npm not found: front-end lint and unit tests skipped")
    return run(python, "-m", "pytest", "tests", *args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main(sys.argv[1:]))
