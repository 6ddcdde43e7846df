"""install.py through the WebUI's own ``launch`` module: installs only what the venv lacks, holds numpy, no torch."""
from __future__ import annotations

import importlib.metadata
import runpy

import webui_harness as harness


def run_installer(monkeypatch, installed):
    import launch   # the WebUI's launch.py (its main() runs only as __main__)
    calls = []
    monkeypatch.setattr(launch, "is_installed", installed)
    monkeypatch.setattr(launch, "run_pip", lambda command, desc=None, **_: calls.append((command, desc)))
    runpy.run_path(str(harness.PACK_ROOT / "install.py"), run_name="__main__")
    return calls


def test_nothing_to_install_when_present(webui, monkeypatch):
    assert run_installer(monkeypatch, lambda name: True) == []


def test_missing_requirement_installed_with_numpy_held(webui, monkeypatch):
    calls = run_installer(monkeypatch, lambda name: name != "faiss-cpu")
    assert len(calls) == 1
    command, desc = calls[0]
    assert command == f'install "faiss-cpu" "numpy=={importlib.metadata.version("numpy")}"'
    assert "torch" not in command and "faiss-cpu" in desc


def test_outside_a_webui_the_installer_does_nothing(tmp_path):
    """ComfyUI-Manager runs install.py too: without the WebUI's launch module it must exit cleanly, installing nothing."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(harness.PACK_ROOT / "install.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "", (done.stdout, done.stderr)
