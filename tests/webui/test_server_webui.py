"""The whole Forge WebUI server, headless and offline, driving one txt2img with the script through its HTTP API.

Runs with ``WEBUI_SERVER_TEST=1`` (``tests/host/run_webui.sh`` sets it unless told 0): it boots the real server (``launch.py --nowebui --api``, loopback only) on a temp
copy of the host tree with this repository linked into ``extensions/`` and a random-weight full-size SD1.5
checkpoint (the server recognises no smaller model), built once from Forge's own classes and cached under
``~/.cache/shielded-sampling/webui-checkpoints/`` (2.1 GB, ~1.5 min to build). With the checkpoint cached the test
takes ~1.5 min on 2 CPU cores (start-up ~45 s, model load ~20 s, three 64x64 2-step generations).

Forge only: reForge's server cannot start offline. Its ``modules/paths.py`` asserts Stability-AI's ``ldm`` repository
(cloned by the launcher; a link to the venv's ``stable-diffusion-sdkit`` passes that), then ``modules/initialize.py``
line 46 runs ``import sgm.modules.encoders.modules``: ``ModuleNotFoundError: No module named 'sgm'`` (Stability-AI's
generative-models, cloned from GitHub by the launcher, on no package index). The in-process tests give it stand-ins.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import webui_harness as harness

CHECKPOINT = Path.home() / ".cache" / "shielded-sampling" / "webui-checkpoints" / "sd15-random-fp16.safetensors"
START_TIMEOUT = 300
RTOL = 1e-3

pytestmark = pytest.mark.skipif(os.environ.get("WEBUI_SERVER_TEST") != "1",
                                reason="boots the whole WebUI server (~1.5 min with the cached checkpoint, ~3 min "
                                       "the first time): set WEBUI_SERVER_TEST=1 to run it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_checkpoint(root: Path) -> Path:
    if not CHECKPOINT.is_file():
        CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        builder = Path(__file__).with_name("random_sd15_checkpoint.py")
        subprocess.run([sys.executable, "-B", str(builder), str(CHECKPOINT)], check=True, timeout=900,
                       env={**os.environ, "WEBUI_PATH": str(root)})
    return CHECKPOINT


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = harness.webui_path()
    if root is None or harness.flavour(root) != "forge":
        pytest.skip("the server test runs on Forge; reForge's server stops at 'import sgm.modules.encoders.modules' "
                    "(modules/initialize.py): Stability-AI's generative-models is cloned from GitHub by its launcher "
                    "and is on no package index")
    checkpoint = ensure_checkpoint(root)
    tree = tmp_path_factory.mktemp("server") / root.name
    shutil.copytree(root, tree, symlinks=True)
    (tree / "extensions").mkdir(exist_ok=True)
    (tree / "extensions" / "shielded-sampling").symlink_to(harness.PACK_ROOT, target_is_directory=True)
    (tree / "models" / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    (tree / "models" / "Stable-diffusion" / checkpoint.name).symlink_to(checkpoint)
    port = free_port()
    log = open(tree / "server.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("WEBUI_PATH", None)
    proc = subprocess.Popen(
        [sys.executable, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all",
         "--no-half", "--no-half-vae", "--always-cpu", "--api", "--nowebui", "--server-name", "127.0.0.1",
         "--port", str(port), "--skip-version-check", "--skip-install", "--no-hashing"],
        cwd=tree, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the WebUI server exited ({proc.returncode}):\n{(tree / 'server.log').read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"{url}/sdapi/v1/samplers", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the WebUI server did not answer within {START_TIMEOUT} s:\n"
                                f"{(tree / 'server.log').read_text()[-4000:]}")
                time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def txt2img(url: str, script_args: list) -> dict:
    body = {"prompt": "a shielded test", "negative_prompt": "", "steps": 2, "width": 64, "height": 64,
            "batch_size": 2, "n_iter": 1, "cfg_scale": 5, "seed": 7, "sampler_name": "Euler",
            "scheduler": "Automatic", "send_images": True, "save_images": False,
            "override_settings": {"live_previews_enable": False},   # the preview VAE would be downloaded
            "override_settings_restore_afterwards": True,
            "alwayson_scripts": {"Shielded sampling": {"args": script_args}}}
    request = urllib.request.Request(f"{url}/sdapi/v1/txt2img", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        out = json.load(response)
    out["info"] = json.loads(out["info"])
    return out


def spell_args(enabled: bool, radius: float) -> list:
    # The accordion's controls in order (ShieldedSettings' fields).
    return [enabled, radius, 1.0, True, False, "webui", 0.0, 1.0, False, "", False, "off", False, "leave it"]


def test_txt2img_through_the_http_api_reports_protection(server):
    plain = txt2img(server, spell_args(False, 1.0))
    shielded = txt2img(server, spell_args(True, 1.0))
    again = txt2img(server, spell_args(True, 1.0))
    assert len(shielded["images"]) == 2 and shielded["images"] == again["images"]     # deterministic
    assert shielded["images"] != plain["images"]
    assert all("SPELL" not in text for text in plain["info"]["infotexts"])
    for text in shielded["info"]["infotexts"]:
        assert "SPELL radius: 1.0, SPELL intra-batch: True" in text, text
        result = re.search(r'SPELL result: "(\d+)/2 corrected, no shield, closest pair ([0-9.e+-]+) rms, 0 inside', text)
        assert result, text
        assert float(result.group(2)) >= 1.0 * (1 - RTOL)
    png = base64.b64decode(shielded["images"][0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
