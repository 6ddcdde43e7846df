#!/usr/bin/env bash
# The project's test command.
#
# 1. Unit tests: makes its own venv (.venv) with CPU torch 2.13.0, the requirements and pytest.
# 2. Front end: eslint and the panel helpers' unit tests (node --test), when Node.js is on the machine.
# 3. Real-host tests: for every ComfyUI tree in SHIELDED_HOSTS (default: ../shared/hosts beside the clone, where
#    this project's machines keep them), the integration and browser tests run inside that host with its own cached
#    venv (tests/host/run_comfy.sh); for every reForge/Forge tree there, the WebUI extension's tests
#    (tests/host/run_webui.sh). Without hosts they are skipped, and the run says so in one line. To run them
#    against your own ComfyUI: COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python -m pytest tests/integration
#
# Extra arguments are passed to every pytest run. Environment:
#   SHIELDED_TEST_VENV    unit-test venv (default .venv)
#   SHIELDED_TORCH_INDEX  index for the CPU torch wheel when no local wheel satisfies torch==2.13.0
#                         (default the PyTorch CPU index, so pip never pulls a multi-GB CUDA build)
#   SHIELDED_HOSTS        folder of host trees (comfyui-*), default ../shared/hosts
#   SHIELDED_REQUIRE_HOSTS=1  fail instead of skipping when no host is found (CI sets it)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SHIELDED_TEST_VENV:-.venv}"
PY="${PYTHON:-python3}"
PIP_QUIET=(-q --disable-pip-version-check)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  if "$VENV/bin/pip" install "${PIP_QUIET[@]}" --no-index --no-deps torch==2.13.0 2>/dev/null; then
    "$VENV/bin/pip" install "${PIP_QUIET[@]}" torch==2.13.0        # a local CPU wheel: now only its dependencies
  else
    "$VENV/bin/pip" install "${PIP_QUIET[@]}" torch==2.13.0 \
      --index-url "${SHIELDED_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" --extra-index-url https://pypi.org/simple
  fi
fi
"$VENV/bin/pip" install "${PIP_QUIET[@]}" -r requirements.txt -r tests/requirements.txt

if command -v npm >/dev/null 2>&1; then
  npm ci --prefix tests/ui --no-audit --no-fund --loglevel=error
  npm --prefix tests/ui run --silent lint
  npm --prefix tests/ui test --silent
else
  echo "npm not found: front-end lint and unit tests skipped"
fi

HOSTS="${SHIELDED_HOSTS:-../shared/hosts}"
COMFY_HOSTS=()
WEBUI_HOSTS=()
for dir in "$HOSTS"/comfyui-*/; do
  [ -f "$dir/comfy/model_patcher.py" ] && COMFY_HOSTS+=("${dir%/}")
done
for dir in "$HOSTS"/*forge*/; do
  [ -f "$dir/modules/processing.py" ] && WEBUI_HOSTS+=("${dir%/}")
done

if [ ${#COMFY_HOSTS[@]} -eq 0 ] || [ ${#WEBUI_HOSTS[@]} -eq 0 ]; then
  if [ "${SHIELDED_REQUIRE_HOSTS:-0}" = 1 ]; then
    echo "SHIELDED_REQUIRE_HOSTS=1 but $HOSTS lacks ComfyUI (comfyui-*) or WebUI (*forge*) hosts" >&2
    exit 1
  fi
  if [ ${#COMFY_HOSTS[@]} -eq 0 ] && [ ${#WEBUI_HOSTS[@]} -eq 0 ]; then
    echo "real-host tests skipped: no host in $HOSTS (COMFYUI_PATH / WEBUI_PATH run them, see README)"
    exec "$VENV/bin/python" -m pytest tests "$@"
  fi
fi

status=0
"$VENV/bin/python" -m pytest tests --ignore=tests/integration --ignore=tests/webui "$@" || status=$?
newest="$(printf '%s\n' "${COMFY_HOSTS[@]}" | sort -V | tail -n 1)"
for host in "${COMFY_HOSTS[@]}"; do
  renderers="classic"
  [ "$host" = "$newest" ] && renderers="classic nodes2"
  SHIELDED_UI_RENDERERS="$renderers" bash tests/host/run_comfy.sh "$host" "$@" || status=$?
done
for host in "${WEBUI_HOSTS[@]}"; do
  bash tests/host/run_webui.sh "$host" "$@" || status=$?
done
exit "$status"
