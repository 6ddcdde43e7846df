"""Where the loader may read and write: folders under known roots (absolute paths only if allowed), files that
resolve inside those roots, and a cache folder with no links in it."""
from __future__ import annotations

from dataclasses import dataclass

import os
import stat
from pathlib import Path

from .errors import ShieldDatabaseError

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


@dataclass(frozen=True)
class FolderInput:
    """How the caller's messages name the folder input and where relative names may live."""

    field: str = "Shield Set Loader: input 'folder'"
    places: str = "input/ or models/shields/"


def resolve_folder(folder: str, roots: list[Path], allowed: list[Path], allow_list_hint: str = "",
                   names: FolderInput = FolderInput()) -> Path:
    """Resolve ``folder`` (relative to one of ``roots``, or absolute inside ``allowed``) to an existing directory.

    Symlinks and ``..`` are resolved first, so nothing escapes the roots. Raises ``ValueError`` naming the input
    as ``names.field``.
    """
    text = (folder or "").strip()
    if not text:
        raise ValueError(f"{names.field} is empty; give a folder name under {names.places}")
    given = Path(text).expanduser()
    if given.is_absolute():
        real = given.resolve()
        ok = [r for r in allowed if _inside(real, Path(r).resolve())]
        if not ok:
            raise ValueError(f"{names.field} {text!r} is an absolute path outside the allowed roots "
                             f"{[str(a) for a in allowed]}; add it to the allow-list ({allow_list_hint}) or use a folder "
                             f"under {names.places}")
        candidates = [real]
    else:
        candidates = []
        for root in roots:
            real_root = Path(root).resolve()
            real = (real_root / given).resolve()
            if _inside(real, real_root):
                candidates.append(real)
        if not candidates:
            raise ValueError(f"{names.field} {text!r} leaves its root folder ({[str(r) for r in roots]})")
    for path in candidates:
        if path.is_dir():
            return path
    raise ValueError(f"{names.field} {text!r} is not a directory under {[str(r) for r in roots]}"
                     + ("" if not given.is_absolute() else " (absolute path not found)"))


def inside_any(path: Path, roots) -> bool:
    """True when the resolved ``path`` lies in one of the resolved ``roots``."""
    real = Path(os.path.realpath(path))
    return any(_inside(real, Path(os.path.realpath(root))) for root in roots)


def file_kind(mode: int) -> str:
    """What a stat mode is, in words, for reports."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def unreadable_reason(lstat_result: os.stat_result, target_stat: os.stat_result, target: Path, roots) -> str | None:
    """Why a folder entry must not be read (``None`` when it is a regular file that may be read).

    ``lstat_result`` is the entry itself, ``target_stat`` what it resolves to (``os.stat`` only reads metadata:
    a FIFO or a device is never opened). Links to folders are not followed; links must stay inside ``roots``.
    """
    if stat.S_ISLNK(lstat_result.st_mode):
        if stat.S_ISDIR(target_stat.st_mode):
            return "a link to a folder (links to folders are not followed)"
        if not stat.S_ISREG(target_stat.st_mode):
            return f"a link to {file_kind(target_stat.st_mode)}, not a regular file"
        if not inside_any(target, roots):
            return "a link to a file outside the allowed folders (not read)"
        return None
    if not stat.S_ISREG(lstat_result.st_mode):
        return f"{file_kind(lstat_result.st_mode)}, not a regular file"
    return None


class UnsafeCacheError(ShieldDatabaseError):
    """The cache folder inside an image folder is a link or holds something other than plain files."""


def check_cache_folder(folder: Path, database: Path) -> None:
    """Refuse a cache whose path or content is a symbolic link, a FIFO or a device, before anything is written.

    Caches live at ``<folder>/.shield_db/<key>/``: a link there (to the cache, its ``shards``/``index``
    folders, its lock, manifest or any stored file) would make a build write, truncate or delete files
    elsewhere, and a FIFO would hang it. Only real folders and regular files are accepted.
    """
    folder = Path(folder)
    try:
        parts = Path(database).relative_to(folder).parts
    except ValueError:
        raise UnsafeCacheError(f"the cache {database} is not inside the image folder {folder}") from None
    path = folder
    for part in parts:
        path = path / part
        _check_cache_entry(path, want_dir=True)
    if not os.path.isdir(database):
        return
    for entry in sorted(os.listdir(database)):
        sub = Path(database) / entry
        _check_cache_entry(sub, want_dir=entry in ("shards", "index"))
        if entry in ("shards", "index") and sub.is_dir():
            for name in sorted(os.listdir(sub)):
                _check_cache_entry(sub / name, want_dir=False)


def _check_cache_entry(path: Path, want_dir: bool) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise UnsafeCacheError(
            f"the shield cache path {path} is a symbolic link (to {os.readlink(path)}); the cache is never written "
            f"through links. Remove the link (move a cache it points to back into place as a real folder) and run "
            f"again; nothing was written")
    if not (stat.S_ISDIR(mode) if want_dir else stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UnsafeCacheError(
            f"the shield cache path {path} is {file_kind(mode)}, where the cache needs a "
            f"{'folder' if want_dir else 'regular file'}; remove it and run again; nothing was written")
