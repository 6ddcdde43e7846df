"""Bring a database in line with a folder of images: encode what is new, drop what is gone, list what is bad."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import manifest
from .database import ShieldDatabase
from .manifest import MTIME, SHA, SIZE, SOURCE
from .lock import database_lock
from .images import IMAGE_EXTENSIONS, FileChanged, UnusableImage, decode_for_encode, read_file, thumbnail
from .paths import check_cache_folder, unreadable_reason

LOG = logging.getLogger("shielded_sampling")
CACHE_DIR = ".shield_db"


@dataclass(frozen=True)
class FileEntry:
    source: str  # path relative to the folder, with forward slashes (undecodable bytes as os.fsdecode gives them)
    path: Path  # what is read: the entry, or the regular file a link inside the allowed roots resolves to
    size: int
    mtime_ns: int


@dataclass
class SyncResult:
    database: Path
    encoded: int = 0
    reused: int = 0
    kept: int = 0
    removed: int = 0
    vae_calls: int = 0
    skipped: list = field(default_factory=list)  # [{"source", "reason", "size", "mtime_ns"}]

    def summary(self) -> str:
        text = (f"{self.kept + self.reused + self.encoded} shields ({self.encoded} encoded, {self.reused} reused by "
                f"content hash, {self.kept} unchanged, {self.removed} removed)")
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: " + "; ".join(
                f"{display_name(s['source'])} ({s['reason']})" for s in self.skipped[:10])
        return text


def display_name(source: str) -> str:
    """``source`` for people: bytes that are not UTF-8 shown as ``\\xe9`` escapes (the stored name keeps them)."""
    return source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def scan(folder: Path, allowed_roots=None) -> tuple[list[FileEntry], list[dict]]:
    """Regular image files below ``folder`` (hidden names and the cache excluded), sorted; the rest listed apart.

    Links to regular files are followed only when they resolve inside ``allowed_roots`` (default: ``folder``);
    links to folders are not followed; FIFOs, devices, sockets and links to them are listed, never opened.
    """
    entries, others = [], []
    _scan_into(str(folder), "", [folder] if allowed_roots is None else list(allowed_roots), entries, others)
    return entries, others


def _scan_into(directory: str, prefix: str, roots: list, entries: list, others: list) -> None:
    with os.scandir(directory) as listing:
        items = sorted(listing, key=lambda d: d.name)
    for item in items:
        if item.name.startswith("."):
            continue
        source = prefix + item.name
        try:
            if item.is_dir(follow_symlinks=False):
                _scan_into(item.path, source + "/", roots, entries, others)
                continue
            st = item.stat()  # follows a link: metadata only, nothing is opened
            path = Path(os.path.realpath(item.path)) if item.is_symlink() else Path(item.path)
            reason = unreadable_reason(item.stat(follow_symlinks=False), st, path, roots)
        except OSError as exc:
            others.append({"source": source, "reason": f"unreadable: {exc}", "size": 0, "mtime_ns": 0})
            continue
        extension = os.path.splitext(item.name)[1]
        if reason is not None:
            others.append({"source": source, "reason": reason, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        elif extension.lower() in IMAGE_EXTENSIONS:
            entries.append(FileEntry(source, path, st.st_size, st.st_mtime_ns))
        else:
            others.append({"source": source, "reason": f"not an image file ({extension or 'no extension'})",
                           "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def fingerprint(folder: Path, *params) -> str:
    """Changes when any file is added, removed, resized or touched, or a parameter changes (no hashing)."""
    entries, others = scan(folder)
    listing = [(e.source, e.size, e.mtime_ns) for e in entries] + [(o["source"], o["size"], o["mtime_ns"]) for o in others]
    return hashlib.sha256(json.dumps([listing, [str(p) for p in params]]).encode()).hexdigest()


def database_folder(folder: Path, vae_fingerprint: str, width: int, height: int, resize: str) -> Path:
    """Where the cache of ``folder`` for this VAE and target lives: ``<folder>/.shield_db/<key>``."""
    key = hashlib.sha256(json.dumps([vae_fingerprint, width, height, resize]).encode()).hexdigest()[:16]
    return folder / CACHE_DIR / f"{width}x{height}-{resize}-{key}"


def _skip(e: FileEntry, exc: UnusableImage) -> dict:
    """A skipped-file record; one that changed while read gets no stat, so the next run tries it again."""
    changed = isinstance(exc, FileChanged)
    return {"source": e.source, "reason": str(exc), "size": -1 if changed else e.size,
            "mtime_ns": -1 if changed else e.mtime_ns}


def _plan(txn, entries: list[FileEntry], result: SyncResult, old_skipped: dict, interrupted):
    """Decide per file: keep, relink by content hash, skip again (unchanged bad file), or encode."""
    todo = []
    for e in entries:
        if interrupted is not None:
            interrupted()
        item = txn.item(e.source)
        if item is not None and item[SIZE] == e.size and item[MTIME] == e.mtime_ns:
            result.kept += 1
            continue
        bad = old_skipped.get(e.source)
        if bad is not None and bad["size"] == e.size and bad["mtime_ns"] == e.mtime_ns:
            result.skipped.append(bad)
            continue
        try:
            read = read_file(e.path, keep=False)
        except UnusableImage as exc:
            result.skipped.append(_skip(e, exc))
            continue
        if item is not None and item[SHA] == read.sha256:
            txn.touch(e.source, read.size, read.mtime_ns)
            result.kept += 1
        elif txn.row_of(read.sha256) is not None:
            txn.link(e.source, read.sha256, txn.row_of(read.sha256), read.size, read.mtime_ns)
            result.reused += 1
        else:
            todo.append(e)  # encoding reads it again: hash, decode and stat of that one read are stored together
    return todo


def sync_folder(folder, encode: Callable[[np.ndarray], "np.ndarray"], item_shape, width: int, height: int,
                resize: str, vae_fingerprint: str, batch_size: int = 8, thumbnail_size: int = 48,
                rebuild: bool = False, database: Path | None = None, progress: Callable[[int, int], None] | None = None,
                commit_rows: int = 256, allowed_roots=None,
                interrupted: Callable[[], None] | None = None) -> SyncResult:
    """Encode new images of ``folder`` with ``encode(uint8 [B, H, W, 3]) -> latents [B, *item_shape]``.

    Unchanged files (same size and mtime, or same sha256) cost no ``encode`` call; removed files are dropped;
    files that cannot be decoded are skipped and listed (and remembered until they change). Encoded shields are
    committed every ``commit_rows``, so an interrupted run resumes where it stopped.

    Only regular files are read, and only where they resolve inside ``allowed_roots`` (default: ``folder``); the
    rest is listed as skipped. A cache inside ``folder`` (the default ``<folder>/.shield_db/``) is refused if any
    part of it is a link.
    ``interrupted()`` is called before each file is hashed and each batch is encoded; whatever it raises stops the
    run after committing every shield encoded so far.
    """
    folder = Path(folder)
    database = Path(database) if database is not None else database_folder(folder, vae_fingerprint, width, height,
                                                                             resize)
    if folder in database.parents:  # a cache inside the image folder (the default): no links, no FIFOs in it
        check_cache_folder(folder, database)
    db = ShieldDatabase(database)
    result = SyncResult(db.folder)
    target = {"width": width, "height": height, "resize": resize}
    entries, others = scan(folder, allowed_roots)
    result.skipped.extend(others)
    if not rebuild and _unchanged(db, entries, others, vae_fingerprint, target, result):
        return result
    with db.writer(item_shape=item_shape, rebuild=rebuild, vae_fingerprint=vae_fingerprint, target=target,
                   thumbnail_size=thumbnail_size) as txn:
        txn.commit_rows = commit_rows
        if txn.body["vae_fingerprint"] != vae_fingerprint or txn.body["target"] != target:
            raise ValueError(f"shield database {db.folder} was built for another VAE or size "
                             f"({txn.body['target']}); rebuild it")
        apply_folder(txn, entries, encode, width, height, resize, batch_size, thumbnail_size, result, progress,
                     interrupted)
    if result.skipped:
        LOG.warning("Shield Set Loader: %s", result.summary())
    return result


def apply_folder(txn, entries: list[FileEntry], encode, width: int, height: int, resize: str, batch_size: int,
                 thumbnail_size: int, result: SyncResult, progress, interrupted) -> None:
    """Inside a writer transaction (file database or PostgreSQL): drop removed files, reuse unchanged and known
    content, encode the rest, remember the skipped files."""
    old_skipped = {s["source"]: s for s in txn.body["skipped"]}
    present = {e.source for e in entries}
    for source in txn.sources():
        if source not in present and txn.remove(source):
            result.removed += 1
    todo = _plan(txn, entries, result, old_skipped, interrupted)
    _encode_all(txn, todo, encode, width, height, resize, batch_size, thumbnail_size, result, progress, interrupted)
    txn.set_skipped(result.skipped)


def _unchanged(db: ShieldDatabase, entries: list[FileEntry], others: list[dict], vae_fingerprint: str,
               target: dict, result: SyncResult) -> bool:
    """True (and ``result`` filled) when the database already lists exactly these files with these stats."""
    if not db.exists():
        return False
    with database_lock(db.folder, exclusive=False, timeout=db.lock_timeout):
        body = manifest.load(db.folder)
    if body["vae_fingerprint"] != vae_fingerprint or body["target"] != target:
        return False
    stored = {item[SOURCE]: (item[SIZE], item[MTIME]) for item in body["items"]}
    old_bad = {s["source"]: (s["size"], s["mtime_ns"]) for s in body["skipped"]}
    images = {e.source: (e.size, e.mtime_ns) for e in entries}
    now = {**{o["source"]: (o["size"], o["mtime_ns"]) for o in others}, **images}
    if any(now.get(source) != stat for source, stat in old_bad.items()):
        return False  # a skipped file changed or went away: try it again / drop it from the list
    if any(o["source"] not in old_bad for o in others):
        return False  # a new non-image file: list it
    if {k: v for k, v in images.items() if k not in old_bad} != stored:
        return False
    result.kept = len(stored)
    result.skipped = list(body["skipped"])
    return True


def _stop_if_interrupted(interrupted, txn) -> None:
    """Call the host's interrupt check between batches; on interrupt, commit what is encoded, then stop."""
    if interrupted is None:
        return
    try:
        interrupted()
    except BaseException:  # ComfyUI's InterruptProcessingException is a BaseException in recent versions
        txn.flush()
        raise


def _encode_all(txn, todo, encode, width, height, resize, batch_size, thumbnail_size, result, progress, interrupted):
    """Encode ``todo`` in batches; each file is read once and its sha256 is that of the very bytes decoded."""
    step, first_of_sha, duplicates = max(1, batch_size), {}, []
    for start in range(0, len(todo), step):
        _stop_if_interrupted(interrupted, txn)
        batch, pixels = [], []
        for e in todo[start:start + step]:
            try:
                read = read_file(e.path)
                if read.sha256 in first_of_sha or txn.row_of(read.sha256) is not None:
                    duplicates.append((e, read.sha256, read.size, read.mtime_ns))
                    continue
                pixels.append(decode_for_encode(read.data, width, height, resize))
            except UnusableImage as exc:
                result.skipped.append(_skip(e, exc))
                continue
            first_of_sha[read.sha256] = e.source
            batch.append((e, read.sha256, read.size, read.mtime_ns))
        if batch:
            latents = np.asarray(encode(np.stack(pixels)), dtype=np.float32)
            result.vae_calls += 1
            if latents.shape != (len(batch), *txn.item_shape):
                raise ValueError(f"the VAE returned latents of shape {latents.shape}, expected "
                                 f"{(len(batch), *txn.item_shape)} for {width}x{height} images")
            for (e, sha, size, mtime_ns), latent, rgb in zip(batch, latents, pixels):
                thumb = thumbnail(rgb, thumbnail_size) if thumbnail_size else None
                txn.add(e.source, sha, latent, thumb, size, mtime_ns)
            result.encoded += len(batch)
        if progress is not None:
            progress(min(len(todo), start + step), len(todo))
    txn.flush()
    for e, sha, size, mtime_ns in duplicates:  # same content as a file stored or encoded above: share its row
        txn.link(e.source, sha, txn.row_of(sha), size, mtime_ns)
        result.reused += 1
