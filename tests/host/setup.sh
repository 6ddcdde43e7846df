#!/usr/bin/env bash
# Build (or reuse) a Python venv that runs a real host from ../shared/hosts for the integration tests.
#
#   bash tests/host/setup.sh HOST_DIR [VENV_DIR]
#
# Follows ../shared/hosts/README.md: torch 2.14.1 + torchvision 0.29.1 from the machine's local disk,
# torchaudio 2.11.1 --no-deps where the host needs it (ComfyUI >= 0.20 imports it), the host's requirements
# without torch, then the pack's and the tests' requirements. Without VENV_DIR the venv is cached under
# ${SHIELDED_HOST_VENVS:-~/.cache/shielded-sampling/host-venvs}/<host>-<hash>, the hash covering this script and
# every requirements file it reads, so a re-run with nothing changed reuses it (no 5 GB reinstall).
# The host tree is only read. Prints the venv's path as its last line.
set -euo pipefail
HOST_DIR="$(cd "${1:?usage: setup.sh HOST_DIR [VENV_DIR]}" && pwd)"
PACK="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python3}"
TORCH="${SHIELDED_HOST_TORCH:-torch==2.14.1 torchvision==0.29.1}"
TORCHAUDIO="${SHIELDED_HOST_TORCHAUDIO:-torchaudio==2.11.1}"

needs_torchaudio() {   # ComfyUI >= 0.20 imports torchaudio from comfy.sd; older hosts do not need it
  grep -qE '^comfy-kitchen|^comfy-aimdo' "$HOST_DIR/requirements.txt" 2>/dev/null
}

key() {
  { cat "$0" "$HOST_DIR/requirements.txt" "$PACK/requirements.txt" "$PACK/tests/requirements.txt"
    echo "$TORCH $TORCHAUDIO $("$PY" --version 2>&1)"; } | sha256sum | cut -c1-16
}

if [ $# -ge 2 ]; then
  VENV="$2"
else
  VENV="${SHIELDED_HOST_VENVS:-$HOME/.cache/shielded-sampling/host-venvs}/$(basename "$HOST_DIR")-$(key)"
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9   # one builder per venv; a second caller waits, then finds it complete
if [ -f "$VENV/.complete" ]; then
  echo "host venv cached: $VENV" >&2
  echo "$VENV"
  exit 0
fi

echo "building host venv for $HOST_DIR in $VENV (a few minutes)" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
# shellcheck disable=SC2086
"${PIP[@]}" $TORCH
if needs_torchaudio; then
  "${PIP[@]}" --no-deps "$TORCHAUDIO"
fi
REQ="$(mktemp)"
trap 'rm -f "$REQ"' EXIT
grep -viE '^(torch|torchvision|torchaudio)([<>=~ ;]|$)' "$HOST_DIR/requirements.txt" > "$REQ"
"${PIP[@]}" -r "$REQ" requests
"${PIP[@]}" -r "$PACK/requirements.txt" -r "$PACK/tests/requirements.txt"
"$VENV/bin/python" -c "import torch, torchvision; print('host venv ready: torch', torch.__version__)" >&2
touch "$VENV/.complete"
echo "$VENV"
