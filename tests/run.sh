#!/usr/bin/env bash
# The project's test command: makes its own venv (.venv) with CPU torch, the requirements and pytest,
# then runs the whole suite. Real-ComfyUI integration tests run when COMFYUI_PATH is set and are
# reported as skipped otherwise. Extra pytest arguments are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SHIELDED_TEST_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt -r tests/requirements.txt
# Front end: eslint and the panel helpers' unit tests (node --test), when Node.js is on the machine.
if command -v npm >/dev/null 2>&1; then
  npm ci --prefix tests/ui --no-audit --no-fund --loglevel=error
  npm --prefix tests/ui run --silent lint
  npm --prefix tests/ui test --silent
else
  echo "npm not found: front-end lint and unit tests skipped"
fi
exec "$VENV/bin/python" -m pytest tests "$@"
