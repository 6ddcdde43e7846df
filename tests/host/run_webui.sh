#!/usr/bin/env bash
# Run the A1111/Forge extension's tests inside one real WebUI host tree (reForge, Forge).
#
#   bash tests/host/run_webui.sh HOST_DIR [pytest args...]
#
# Builds or reuses the host's venv (tests/host/setup_webui.sh) and runs tests/webui with it, WEBUI_PATH pointing
# at the tree. The tree is only read: the harness keeps the WebUI's data (models, outputs, settings) in a temp dir.
set -euo pipefail
HOST_DIR="$(cd "${1:?usage: run_webui.sh HOST_DIR [pytest args...]}" && pwd)"
shift
PACK="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$(bash "$PACK/tests/host/setup_webui.sh" "$HOST_DIR" | tail -n 1)"
echo "== WebUI extension tests on $(basename "$HOST_DIR") ($VENV/bin/python)"
cd "$PACK"
# The headless server test (Forge only; ~1.5 min, plus ~1.5 min once to build its 2.1 GB random checkpoint under
# ~/.cache/shielded-sampling/webui-checkpoints/). WEBUI_SERVER_TEST=0 leaves it out.
WEBUI_SERVER_TEST="${WEBUI_SERVER_TEST:-1}" WEBUI_PATH="$HOST_DIR" "$VENV/bin/python" -m pytest tests/webui \
  -p no:cacheprovider "$@"
