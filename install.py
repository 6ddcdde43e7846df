"""Run by the Automatic1111 / Forge launcher (``extensions/<this repository>/install.py``) in the WebUI's venv.

Installs the pack's requirements (``requirements.txt``: the same list ComfyUI installs) that the WebUI's venv
lacks, through the launcher's own ``launch.run_pip``. Packages already present are left alone, and numpy is held
at the WebUI's version so that no install here moves the host's pins (torch is never touched: it is the host's).
ComfyUI-Manager also runs an ``install.py`` it finds in a node pack; there is no ``launch`` module there and the
manager installs ``requirements.txt`` itself, so this file then does nothing.
"""
import importlib.metadata
import re
import sys
from pathlib import Path

try:
    import launch
except ImportError:   # not started by an A1111-family launcher (e.g. ComfyUI-Manager)
    sys.exit(0)

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
HOST_OWNED = {"torch", "torchvision", "torchaudio"}


def requirement_names(text: str) -> list[tuple[str, str]]:
    """``(distribution name, requirement line)`` for every requirement of a requirements file."""
    out = []
    for line in text.splitlines():
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        name = re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip()
        if name.lower() not in HOST_OWNED:
            out.append((name, spec))
    return out


def missing(requirements: list[tuple[str, str]]) -> list[str]:
    return [spec for name, spec in requirements if not launch.is_installed(name)]


def held_numpy() -> list[str]:
    try:
        return [f"numpy=={importlib.metadata.version('numpy')}"]
    except importlib.metadata.PackageNotFoundError:
        return []


todo = missing(requirement_names(REQUIREMENTS.read_text(encoding="utf-8")))
if todo:
    specs = " ".join(f'"{s}"' for s in todo + held_numpy())
    launch.run_pip(f"install {specs}", f"shielded sampling requirements: {', '.join(todo)}")
