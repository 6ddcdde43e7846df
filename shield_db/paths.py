"""Which folders a user may point the loader at: names under known roots, absolute paths only if allowed."""
from __future__ import annotations

import os
from pathlib import Path

ALLOWED_ROOTS_ENV = "SHIELD_SET_ALLOWED_ROOTS"
ALLOWED_ROOTS_FILE = "allowed_roots.txt"


def read_allow_list(file: Path | None) -> list[Path]:
    """Absolute folders from ``$SHIELD_SET_ALLOWED_ROOTS`` (os.pathsep separated) and ``file`` (one per line, # comments)."""
    entries = [p for p in os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    if file is not None and Path(file).is_file():
        for line in Path(file).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append(line)
    return [Path(p).expanduser() for p in entries if Path(p).expanduser().is_absolute()]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_folder(folder: str, roots: list[Path], allowed: list[Path], allow_list_hint: str = "") -> Path:
    """Resolve ``folder`` (relative to one of ``roots``, or absolute inside ``allowed``) to an existing directory.

    Symlinks and ``..`` are resolved first, so nothing escapes the roots. Raises ``ValueError`` naming the input.
    """
    text = (folder or "").strip()
    if not text:
        raise ValueError("Shield Set Loader: input 'folder' is empty; give a folder name under input/ or models/shields/")
    given = Path(text).expanduser()
    if given.is_absolute():
        real = given.resolve()
        ok = [r for r in allowed if _inside(real, Path(r).resolve())]
        if not ok:
            raise ValueError(f"Shield Set Loader: input 'folder' {text!r} is an absolute path outside the allowed roots "
                             f"{[str(a) for a in allowed]}; add it to the allow-list ({allow_list_hint}) or use a folder "
                             f"under input/ or models/shields/")
        candidates = [real]
    else:
        candidates = []
        for root in roots:
            real_root = Path(root).resolve()
            real = (real_root / given).resolve()
            if _inside(real, real_root):
                candidates.append(real)
        if not candidates:
            raise ValueError(f"Shield Set Loader: input 'folder' {text!r} leaves its root folder ({[str(r) for r in roots]})")
    for path in candidates:
        if path.is_dir():
            return path
    raise ValueError(f"Shield Set Loader: input 'folder' {text!r} is not a directory under {[str(r) for r in roots]}"
                     + ("" if not given.is_absolute() else " (absolute path not found)"))
