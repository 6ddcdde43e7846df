#!/usr/bin/env bash
# Build (or reuse) a Python venv that runs an Automatic1111-family WebUI from ../shared/hosts
# (reForge, Forge; A1111 1.10's own modules are inside both) for the tests in tests/webui/.
#
#   bash tests/host/setup_webui.sh HOST_DIR [VENV_DIR]
#
# Same recipe as tests/host/setup.sh (the ComfyUI one): torch 2.14.1 + torchvision 0.29.1 from the machine's
# local disk, then the host's pinned list (requirements_versions.txt, the one its launcher installs) without
# torch, then the pack's and the tests' requirements. Lines the offline machine cannot install are rewritten or
# dropped, each one named in the build log:
#   - a direct URL wheel (reForge pins its patched pydantic 1.10.15 from a GitHub release): replaced by the
#     same version from PyPI (only the WebUI's API models use pydantic; the sampler path does not);
#   - torch/torchvision/torchaudio and xformers: the machine's torch build is installed first instead, and a
#     constraint file keeps it through every later install (a pin that would need another torch fails loudly);
#   - setuptools==69.5.1 (reForge, Forge: "temp fix for compatibility with some old packages"): torch 2.14.1
#     requires setuptools >= 77.0.3, so it becomes >=77.0.3,<81 (81 removed pkg_resources, which the host's
#     older packages such as pytorch_lightning still import).
# reForge's modules/paths.py asserts that Stability-AI's stablediffusion repository (the `ldm` package) was
# cloned into repositories/ by its launcher, and modules/processing.py imports from it; offline that clone
# cannot happen, so the same `ldm` code comes from PyPI's stable-diffusion-sdkit==2.1.5 (--no-deps: its pins
# are years old; the host's list already brings what `ldm` imports). Tests point modules/paths.py at it by
# running with a working directory that holds an `ldm` link (tests/webui/webui_harness.py). Likewise the
# launcher installs OpenAI's CLIP from a GitHub archive (k-diffusion's evaluation module imports `clip`): the
# same code comes from PyPI's openai-clip==1.0.1, and Forge's launcher clones lllyasviel/huggingface_guess (model
# detection, imported by modules/sd_models.py): PyPI's huggingface-guess==0.1.0 is the same package. Stability-AI's generative-models (`sgm`, SDXL only) is on no
# package index: the test harness gives reForge empty stand-in modules for it.
# Without VENV_DIR the venv is cached under
# ${SHIELDED_HOST_VENVS:-~/.cache/shielded-sampling/host-venvs}/<host>-<hash>, the hash covering this script and
# every requirements file it reads, so a re-run with nothing changed reuses it. The host tree is only read.
# Prints the venv's path as its last line.
set -euo pipefail
HOST_DIR="$(cd "${1:?usage: setup_webui.sh HOST_DIR [VENV_DIR]}" && pwd)"
PACK="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python3}"
TORCH="${SHIELDED_HOST_TORCH:-torch==2.14.1 torchvision==0.29.1}"
HOST_REQ="$HOST_DIR/requirements_versions.txt"
[ -f "$HOST_REQ" ] || { echo "no requirements_versions.txt in $HOST_DIR: not an A1111-family WebUI?" >&2; exit 2; }

key() {
  { cat "$0" "$HOST_REQ" "$PACK/requirements.txt" "$PACK/tests/requirements.txt"
    echo "$TORCH $("$PY" --version 2>&1)"; } | sha256sum | cut -c1-16
}

if [ $# -ge 2 ]; then
  VENV="$2"
else
  VENV="${SHIELDED_HOST_VENVS:-$HOME/.cache/shielded-sampling/host-venvs}/$(basename "$HOST_DIR")-$(key)"
fi

if [ -f "$VENV/.complete" ]; then
  echo "host venv cached: $VENV" >&2
  echo "$VENV"
  exit 0
fi

echo "building WebUI host venv for $HOST_DIR in $VENV (a few minutes)" >&2
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
# shellcheck disable=SC2086
"${PIP[@]}" $TORCH
REQ="$(mktemp)"; KEEP="$(mktemp)"
trap 'rm -f "$REQ" "$KEEP"' EXIT
"$VENV/bin/python" -c "import torch, torchvision; print('torch==' + torch.__version__.split('+')[0]); print('torchvision==' + torchvision.__version__.split('+')[0])" > "$KEEP"
while IFS= read -r line; do
  spec="${line%%#*}"; spec="$(echo "$spec" | tr -d '\r' | xargs)"   # reForge's list has CRLF line ends
  [ -z "$spec" ] && continue
  if echo "$spec" | grep -qiE '^(torch|torchvision|torchaudio|xformers)([<>=~ ;]|$)'; then
    echo "  left out (the machine's torch build is used): $spec" >&2; continue
  fi
  if echo "$spec" | grep -qiE '^setuptools([<>=~ ;]|$)'; then
    echo "  rewritten (torch 2.14.1 needs setuptools >= 77; pkg_resources needs < 81): $spec -> setuptools>=77.0.3,<81" >&2
    spec="setuptools>=77.0.3,<81"
  fi
  if echo "$spec" | grep -qE '^https?://'; then
    wheel="$(basename "$spec")"
    name="${wheel%%-*}"; version="$(echo "$wheel" | cut -d- -f2)"
    echo "  rewritten (direct URL, offline): $spec -> $name==$version" >&2
    spec="$name==$version"
  fi
  echo "$spec" >> "$REQ"
done < "$HOST_REQ"
"${PIP[@]}" -c "$KEEP" -r "$REQ"
if grep -q "stable-diffusion-stability-ai" "$HOST_DIR/modules/paths.py" 2>/dev/null; then
  "${PIP[@]}" -c "$KEEP" --no-deps stable-diffusion-sdkit==2.1.5
fi
if grep -q "huggingface_guess_repo" "$HOST_DIR/modules/launch_utils.py" 2>/dev/null; then
  "${PIP[@]}" -c "$KEEP" --no-deps huggingface-guess==0.1.0
fi
if grep -q "clip_package" "$HOST_DIR/modules/launch_utils.py" 2>/dev/null; then
  "${PIP[@]}" -c "$KEEP" openai-clip==1.0.1
fi
"${PIP[@]}" -c "$KEEP" -r "$PACK/requirements.txt" -r "$PACK/tests/requirements.txt" requests
"$VENV/bin/python" -c "import torch, torchvision, gradio; print('WebUI host venv ready: torch', torch.__version__, 'gradio', gradio.__version__)" >&2
touch "$VENV/.complete"
echo "$VENV"
