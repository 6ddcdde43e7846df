#!/usr/bin/env bash
# Run the pack's integration tests inside one real ComfyUI host tree.
#
#   bash tests/host/run_comfy.sh HOST_DIR [pytest args...]
#
# Builds or reuses the host's venv (tests/host/setup.sh), copies the read-only host tree into a fresh temp dir
# (the tests write custom_nodes/, models/, user/ there), points COMFYUI_PATH at the copy and runs
# tests/integration with the host's Python. SHIELDED_UI_RENDERERS (e.g. "classic nodes2") chooses the front-end
# renderers the browser tests run with; default: classic only.
set -euo pipefail
HOST_DIR="$(cd "${1:?usage: run_comfy.sh HOST_DIR [pytest args...]}" && pwd)"
shift
PACK="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$(bash "$PACK/tests/host/setup.sh" "$HOST_DIR" | tail -n 1)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/shielded-host-XXXXXX")"
cleanup() { chmod -R u+w "$WORK" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
COPY="$WORK/$(basename "$HOST_DIR")"
cp -r "$HOST_DIR" "$COPY"
chmod -R u+w "$COPY"
echo "== integration tests on $(basename "$HOST_DIR") ($VENV/bin/python, renderers: ${SHIELDED_UI_RENDERERS:-classic})"
cd "$PACK"
COMFYUI_PATH="$COPY" SHIELDED_UI_ARTIFACTS="${SHIELDED_UI_ARTIFACTS:-$PACK/artifacts/ui}/$(basename "$HOST_DIR")" \
  "$VENV/bin/python" -m pytest tests/integration -p no:cacheprovider "$@"
