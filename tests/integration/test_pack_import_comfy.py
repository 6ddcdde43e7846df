"""The pack in a real ComfyUI when an optional dependency is missing: the rest of the pack still registers.

Runs in a fresh host Python (a subprocess) where ``import faiss`` fails, as on a machine whose faiss-cpu wheel
is absent or broken: SPELL, DNG and particle nodes must register, and the Shield Set Loader must stay visible
and name the missing dependency and the fix when it runs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import shield_harness as harness

HERE = Path(__file__).resolve().parent

PROBE = """
import json, sys
sys.modules["faiss"] = None          # import faiss -> ImportError, as with a missing wheel
import shield_harness as h
h.boot_comfy()
pack = h.load_pack()
error = None
try:
    pack.NODE_CLASS_MAPPINGS["ShieldSetLoader"]().load("shields", None, 64, 64, "center-crop", 1)
except Exception as err:             # the error users see in the queue
    error = f"{type(err).__name__}: {err}"
print(json.dumps({"nodes": sorted(pack.NODE_CLASS_MAPPINGS), "error": error}))
"""


def probe():
    env = {**os.environ, "COMFYUI_PATH": str(harness.comfy_path()), "PYTHONPATH": str(HERE)}
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=HERE, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_pack_registers_every_node_without_faiss(pack):
    seen = probe()
    assert sorted(pack.NODE_CLASS_MAPPINGS) == seen["nodes"]      # nothing vanished, loader included
    assert {"ShieldedApplySpell", "ShieldedSpellSampler", "ShieldSetLoader"} <= set(seen["nodes"])


def test_shield_set_loader_names_the_missing_dependency():
    error = probe()["error"]
    assert error is not None and "Shield Set Loader" in error
    assert "faiss" in error and "pip install" in error
