"""sha256 of database files, computed once per version of a file, in this process and across processes.

Opening a database checks every shard against the manifest. Hashing 8 GB of shards (a million shields) takes
~15 s, on every start of ComfyUI. A file whose identity key is the one it had when it was hashed is taken to be
unchanged. The key is size, modification time (ns), inode, device, status-change time (ctime, ns) and, where
``os.stat`` reports one, the file generation number (``st_gen``, BSD/macOS). Programs can set mtime back
(``touch -d``, ``os.utime``) but not ctime: the kernel sets it to the current time on every write, chmod,
rename or utime. A verdict is only reused if the file's ctime and mtime are at least
:data:`RACY_MARGIN_NS` older than the hashing itself, so an edit in the same clock tick as the hash cannot
hide (the "racy clean" case). See ``docs/shield_db_storage.md`` for what remains trusted.

The verdicts live in memory and in ``<db>/verified.json``. That file is advisory: a verdict that disagrees with
the manifest makes the caller re-hash the file (:func:`verified_sha256` with ``expected``) and the record is
rewritten, so a damaged record never blames an intact shard. ``python -m shield_db verify`` ignores the
verdicts and re-hashes everything.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .errors import CorruptDatabaseError
from .storage import sha256_file, write_bytes_atomic

LOG = logging.getLogger("shielded_sampling")
RECORD_NAME = "verified.json"
RECORD_FORMAT = "shield_db-verified-2"
RACY_MARGIN_NS = 2_000_000_000  # covers 2 s timestamp granularity (FAT, some network file systems)
_MEMORY: dict[tuple, str] = {}


def stat_key(path: Path) -> list:
    """What must stay equal for a file to count as the version that was hashed."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns, getattr(st, "st_gen", 0)]


def _load_record(folder: Path) -> dict:
    try:
        doc = json.loads((folder / RECORD_NAME).read_bytes())
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == RECORD_FORMAT else None
    return files if isinstance(files, dict) else {}


def _save_record(folder: Path, files: dict) -> None:
    try:
        files = {name: entry for name, entry in files.items() if (folder / name).is_file()}
        write_bytes_atomic(folder / RECORD_NAME, json.dumps({"format": RECORD_FORMAT, "files": files}).encode())
    except OSError as exc:  # a read-only database still works: it is hashed again next time
        LOG.debug("shield_db: could not write %s: %s", folder / RECORD_NAME, exc)


def _recorded(entry, key: list):
    """The sha256 of a record entry ``[*key, hashed_at_ns, sha]`` if it applies to ``key`` and is not racy."""
    if not (isinstance(entry, list) and len(entry) == len(key) + 2 and entry[:len(key)] == key):
        return None
    hashed_at, sha = entry[-2], entry[-1]
    if not isinstance(hashed_at, int) or not isinstance(sha, str):
        return None
    size, mtime, _, _, ctime, _ = key
    return sha if max(mtime, ctime) + RACY_MARGIN_NS <= hashed_at else None


def verified_sha256(path: Path, folder: Path, expected: str | None = None) -> str:
    """sha256 of ``path`` (a file inside the database ``folder``), hashed only if this version is new.

    With ``expected`` (the manifest's checksum), a remembered verdict that differs is not believed: the file is
    hashed again and the record corrected.
    """
    key = stat_key(path)
    memo = (str(path), *key)
    if memo in _MEMORY and (expected is None or _MEMORY[memo] == expected):
        return _MEMORY[memo]
    files = _load_record(folder)
    name = path.relative_to(folder).as_posix()
    sha = _recorded(files.get(name), key)
    if sha is None or (expected is not None and sha != expected):
        started = time.time_ns()
        try:
            sha = sha256_file(path)
        except OSError as exc:
            raise CorruptDatabaseError(folder, path, f"unreadable: {exc}") from None
        if stat_key(path) == key:  # unchanged while it was read
            files[name] = [*key, started, sha]
            _save_record(folder, files)
    _MEMORY[memo] = sha
    return sha


def remember(path: Path, sha: str) -> None:
    """Record in memory the sha256 of a file this process just wrote and read back (no second hash)."""
    _MEMORY[(str(path), *stat_key(path))] = sha
