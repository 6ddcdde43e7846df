"""The pack's front end in headless Chromium against a real ComfyUI server on 127.0.0.1.

Needs: COMFYUI_PATH (a ComfyUI checkout whose Python runs this test), Debian's chromium (/usr/bin/chromium or
CHROMIUM_PATH), node + the npm packages of tests/ui (``cd tests/ui && npm ci``: playwright-core, eslint). Each
missing piece skips with its reason. The test

* installs the pack by a symlink ``custom_nodes/comfyui-shielded-sampling`` (left in place if it exists),
* writes a random SD1.5-format checkpoint into ``models/checkpoints`` once (tests/ui/make_tiny_checkpoint.py), and
  random Flux / WAN 2.1 diffusion models, a CLIP-L text encoder and their VAEs (tests/ui/make_tiny_models.py) that
  stand in for the real files the Flux and WAN workflows name,
* puts ``example.png`` with a painted (transparent) mask into the input folder for the inpainting workflow,
* starts ``main.py --cpu`` on a free port with user/input/output/temp folders in a temp directory, only this
  pack's custom nodes, and stops it by PID at the end,
* runs tests/ui/ui_check.mjs (Chromium via playwright-core, never a downloaded browser) and asserts on what it saw.

Screenshots are kept in ``$SHIELDED_UI_ARTIFACTS`` (default ``<repo>/artifacts/ui``, git-ignored).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import shield_harness as harness

PACK_ROOT = harness.PACK_ROOT
UI_DIR = PACK_ROOT / "tests" / "ui"
sys.path.insert(0, str(UI_DIR))
import make_tiny_models as tiny  # noqa: E402  (stdlib-only at import; torch is imported inside build())

PACK_FOLDER = "comfyui-shielded-sampling"
TINY_CKPT = "shielded_tiny_sd15.safetensors"
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("SHIELDED_UI_ARTIFACTS", PACK_ROOT / "artifacts" / "ui"))
SPELL_DISPLAY = ["Apply SPELL", "SPELL Sampler", "SPELL Report", "SPELL Radius Calibration", "DNG Report"]


RENDERERS = os.environ.get("SHIELDED_UI_RENDERERS", "classic").split()   # "classic" and/or "nodes2"
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"   # the front end's "Nodes 2.0" renderer (front end >= 1.27)


def missing_tools() -> str | None:
    if harness.comfy_path() is None:
        return "COMFYUI_PATH is not set to a ComfyUI checkout"
    if not CHROMIUM.exists():
        return f"chromium not found at {CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)"
    if shutil.which("node") is None:
        return "node is not installed"
    if not (UI_DIR / "node_modules" / "playwright-core").is_dir():
        return "tests/ui/node_modules is missing: run `npm ci` in tests/ui"
    return None


if missing_tools() is not None and os.environ.get("SHIELDED_REQUIRE_HOSTS") == "1" and harness.comfy_path():
    raise RuntimeError(f"UI tests are required here (SHIELDED_REQUIRE_HOSTS=1) but cannot run: {missing_tools()}")
pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed(comfy: Path):
    link = comfy / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    env = {**os.environ, "COMFYUI_PATH": str(comfy)}
    ckpt = comfy / "models" / "checkpoints" / TINY_CKPT
    if not ckpt.exists():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(UI_DIR / "make_tiny_checkpoint.py"), str(ckpt)], check=True, env=env,
                       timeout=600)
    if not all((comfy / "models" / name).exists() for name in set(tiny.TINY_FOR_REAL.values())):
        subprocess.run([sys.executable, str(UI_DIR / "make_tiny_models.py"), str(comfy / "models")], check=True,
                       env=env, timeout=600)


def tiny_models_argument() -> str:
    """What ui_check.mjs swaps into the loaded workflows: the tiny checkpoint and the tiny stand-in files."""
    return json.dumps({"checkpoint": TINY_CKPT, "text_encoder_type": tiny.TEXT_ENCODER_TYPE,
                       "files": {real: Path(name).name for real, name in tiny.TINY_FOR_REAL.items()}})


def protected_images(folder: Path, count: int = 3):
    """A few small solid-colour PNGs for the Shield Set Loader workflows (folder 'shields' under input/)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (60 * i + 40, 200 - 50 * i, 90)).save(folder / f"protected_{i}.png")


def inpaint_image(path: Path):
    """Load Image's default file with a painted mask: the right half is transparent (Load Image's MASK = 1)."""
    from PIL import Image
    image = Image.new("RGBA", (64, 64), (120, 140, 200, 255))
    image.paste((0, 0, 0, 0), (32, 0, 64, 64))
    image.save(path)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "system_stats", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = harness.comfy_path()
    ensure_installed(comfy)
    work = tmp_path_factory.mktemp("comfy_ui")
    dirs = {name: work / name for name in ("user", "input", "output", "temp")}
    for d in dirs.values():
        d.mkdir()
    protected_images(dirs["input"] / "shields")
    inpaint_image(dirs["input"] / "example.png")
    port = free_port()
    log = work / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--use-pytorch-cross-attention", "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_FOLDER,
           "--user-directory", str(dirs["user"]), "--input-directory", str(dirs["input"]),
           "--output-directory", str(dirs["output"]), "--temp-directory", str(dirs["temp"])]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=comfy, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_ready(url, proc, log)
        yield {"url": url, "log": log}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, ARTIFACTS / "server.log")


def choose_renderer(url: str, renderer: str):
    """Store the front end's renderer setting for this server's user before the page loads."""
    body = json.dumps(renderer == "nodes2").encode()
    request = urllib.request.Request(f"{url}api/settings/{VUE_NODES_SETTING}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


@pytest.fixture(scope="module", params=RENDERERS)
def ui(server, request):
    renderer = request.param
    artifacts = ARTIFACTS / renderer
    artifacts.mkdir(parents=True, exist_ok=True)
    choose_renderer(server["url"], renderer)
    run = subprocess.run(["node", "ui_check.mjs", server["url"], str(artifacts), tiny_models_argument(), renderer],
                         cwd=UI_DIR,
                         capture_output=True, text=True, timeout=1800)
    (artifacts / "ui_result.json").write_text(run.stdout)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert "crash" not in result, result.get("crash")
    return result


def test_front_end_lint():
    eslint = UI_DIR / "node_modules" / ".bin" / "eslint"
    run = subprocess.run([str(eslint), "--config", "tests/ui/eslint.config.js", "web", "tests/ui"],
                         cwd=PACK_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_front_end_helpers_unit():
    run = subprocess.run(["node", "--test", "tests/ui/spell_panel.test.mjs"], cwd=PACK_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "# pass 5" in run.stdout


def test_front_end_runs_the_requested_renderer(ui):
    assert ui["renderer"]["vueNodes"] == (ui["renderer"]["requested"] == "nodes2"), ui["renderer"]


def test_extension_loads_without_console_errors(ui):
    errors = ui["errors"]
    assert errors["extension_loaded"]
    assert errors["mentioning_pack"] == []
    assert [e for e in errors["only_with_extension"] if e not in ("host: favicon", "host: offline")] == []
    assert [e for e in errors["after_all"] if PACK_FOLDER in e or "shielded" in e] == []


def test_every_pack_node_is_found_by_the_node_search(ui):
    assert set(SPELL_DISPLAY) <= set(ui["pack_nodes"])
    for name in ui["pack_nodes"]:
        options = [o.split("\n")[0].strip() for o in ui["search"][name]]
        assert name in options, (name, ui["search"][name])


def test_every_example_workflow_loads_and_validates(ui):
    files = sorted(p.stem for p in (PACK_ROOT / "example_workflows").glob("*.json"))
    assert files and sorted(ui["workflows_listed"]) == files      # all offered in the template browser
    for name in files:
        wf = ui["workflows"][name]
        assert wf["missing"] == [] and wf["dialogs"] == [], (name, wf)
        assert wf["run"]["kind"] == "success", (name, wf["run"])   # /prompt validated and ran on the tiny ckpt


def test_workflows_of_real_graphs_ran_what_they_show(ui, server):
    """The inpainting, Flux and WAN workflows ran with their painted mask and the model families they name."""
    for name in ("spell_inpaint_shield_set", "spell_hires_fix", "spell_flux_shield_folder", "spell_wan_video_batch"):
        assert ui["workflows"][name]["run"]["kind"] == "success", (name, ui["workflows"][name]["run"])
    log = server["log"].read_text()
    assert "inpaint: mask frees 50% of the latent" in log          # example.png's transparent half
    assert "inpainting mask is empty" not in log
    assert "resized to 4x12x12" in log                             # the hires pass compared at its own size
    assert "Requested to load Flux" in log and "Requested to load WAN21" in log


def test_extension_widgets_render_with_tooltips(ui):
    w, tips = ui["widgets"], ui["widgets"]["expected"]
    for key, tip in (("l2", "l2"), ("scale", "scale"), ("calibration", "calibration"), ("requeue", "requeue"),
                     ("toggle", "requeue"), ("activity", "activity")):
        assert w[key]["visible"], key
        assert w[key]["title"] == tips[tip], key
    assert w["toggleChecked"] is False                               # re-queue is off by default
    assert w["l2"]["text"].startswith("raw L2 radius 2.4 (= 0.15")    # 0.15 x sqrt(4*8*8) for a 64 px latent
    assert w["calibration"]["text"].startswith("calibrated median ")
    assert w["markerPixels"] > 0                                      # the calibrated median drawn on the scale
    assert w["radius_tooltip"].startswith("Shield radius, resolution-free")   # host tooltip of the slider
    assert ui["calibration"]["text"].startswith("median pairwise distance of")


def test_activity_chart_appears_after_a_run(ui):
    run = ui["run"]
    assert run["queue"]["kind"] == "success"
    panel = run["panel"]
    activity = panel["activity"]
    assert activity["elements"] == 256 and activity["radius_rms"] == pytest.approx(0.15)
    assert len(activity["corrected"]) == len(activity["batch"]) == len(activity["relative"]) > 0
    assert panel["visible"]
    assert panel["chartInfo"]["bars"] == sum(1 for c in activity["corrected"] if c > 0)
    assert panel["barPixels"] > 100 and panel["linePixels"] > 20
    assert [(i["w"], i["h"]) for i in run["report_images"]][0] == (768, 400)   # SPELL Report previews its chart


def test_requeue_on_release_is_debounced_and_cleaned_up(ui):
    r = ui["requeue"]
    assert r["off"] == 0                       # toggle off: slider changes queue nothing
    assert r["property"] is True               # the toggle is saved in the node's properties
    assert r["during"] == 0 and r["after"] == 1   # one queue after a burst of changes, not one per change
    assert r["after_removal"] == 1             # removing the node cancels its pending re-queue
    assert r["panels_left"] == 0
