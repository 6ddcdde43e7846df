#!/usr/bin/env bash
# One-command SPELL demo: makes its own venv (.venv-demo in the repo), installs what it needs, runs the demo.
#   bash demo/run.sh                      # defaults; extra args go to the demo, e.g. --seed 3 --radius-factor 0.5
# Installs: torch==2.13.0 (CPU), numpy, pillow, onnxruntime, and adaptive-terrain-diffusion==0.4.2 with --no-deps
# (its metadata asks for onnxruntime-gpu; the CPU runtime is enough). On a machine whose pip does not find a CPU
# torch wheel by default, point it at one first, e.g. DEMO_TORCH_INDEX=https://download.pytorch.org/whl/cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=".venv-demo"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[demo] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[demo] installing torch 2.13.0 (CPU)"
    if [ -n "${DEMO_TORCH_INDEX:-}" ]; then
        "${PIP[@]}" --index-url "$DEMO_TORCH_INDEX" torch==2.13.0
    else
        "${PIP[@]}" torch==2.13.0
    fi
fi
echo "[demo] installing numpy, pillow, onnxruntime, adaptive-terrain-diffusion 0.4.2"
"${PIP[@]}" numpy pillow onnxruntime
"${PIP[@]}" --no-deps adaptive-terrain-diffusion==0.4.2
echo "[demo] running (about a minute of CPU on 2 free cores; longer on a busy machine)"
exec "$VENV/bin/python" -m demo "$@"
