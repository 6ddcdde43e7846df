"""sha256 of database files, computed once per version of a file, in this process and across processes.

Opening a database checks every shard against the manifest. Hashing 8 GB of shards (a million shields) takes
~15 s, on every start of ComfyUI. A file whose size, modification time (ns) and inode are those it had when
it was hashed is taken to be unchanged: truncating, rewriting or replacing it changes one of them, and the
file is hashed again. The verdicts live in memory and in ``<db>/verified.json``; ``python -m shield_db
verify`` ignores them and re-hashes everything (it is the check for damage that keeps all three).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .storage import sha256_file, write_bytes_atomic

LOG = logging.getLogger("shielded_sampling")
RECORD_NAME = "verified.json"
RECORD_FORMAT = "shield_db-verified"
_MEMORY: dict[tuple, str] = {}


def _stat_key(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _load_record(folder: Path) -> dict:
    try:
        doc = json.loads((folder / RECORD_NAME).read_bytes())
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == RECORD_FORMAT else None
    return files if isinstance(files, dict) else {}


def _save_record(folder: Path, files: dict) -> None:
    files = {name: entry for name, entry in files.items() if (folder / name).is_file()}
    try:
        write_bytes_atomic(folder / RECORD_NAME, json.dumps({"format": RECORD_FORMAT, "files": files}).encode())
    except OSError as exc:  # a read-only database still works: it is hashed again next time
        LOG.debug("shield_db: could not write %s: %s", folder / RECORD_NAME, exc)


def verified_sha256(path: Path, folder: Path) -> str:
    """sha256 of ``path`` (a file inside the database ``folder``), hashed only if this version is new."""
    key = _stat_key(path)
    memo = (str(path), *key)
    if memo in _MEMORY:
        return _MEMORY[memo]
    files = _load_record(folder)
    name = path.relative_to(folder).as_posix()
    entry = files.get(name)
    if isinstance(entry, list) and len(entry) == 4 and entry[:3] == key and isinstance(entry[3], str):
        sha = entry[3]
    else:
        sha = sha256_file(path)
        files[name] = [*key, sha]
        _save_record(folder, files)
    _MEMORY[memo] = sha
    return sha
