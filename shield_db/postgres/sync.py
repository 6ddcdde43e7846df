"""Bring a PostgreSQL shield set in line with a folder of images (same rules as :func:`shield_db.folder.sync_folder`).

The folder scan, the per-file plan (keep / relink by content hash / skip again / encode) and the batched encoding
are :mod:`shield_db.folder`'s own; only the store differs. A set is named after the folder's cache key (VAE, size,
resize mode), so one server holds the sets of many folders and sizes.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from ..folder import SyncResult, apply_folder, scan
from .store import PostgresShieldStore, connect, read_meta

LOG = logging.getLogger("shielded_sampling")


def set_name(folder: Path, vae_fingerprint: str, width: int, height: int, resize: str) -> str:
    """A schema-safe name for ``folder``'s set at this VAE and target size."""
    key = hashlib.sha256(json.dumps([str(Path(folder).resolve()), vae_fingerprint, width, height, resize])
                         .encode()).hexdigest()[:20]
    return f"f{width}x{height}_{resize.replace('-', '_')}_{key}"


def sync_folder_postgres(folder, encode: Callable[[np.ndarray], np.ndarray], item_shape, width: int, height: int,
                         resize: str, vae_fingerprint: str, dsn: str, name: str | None = None, batch_size: int = 8,
                         thumbnail_size: int = 48, rebuild: bool = False,
                         progress: Callable[[int, int], None] | None = None, commit_rows: int = 256,
                         allowed_roots=None, interrupted: Callable[[], None] | None = None, shards=(None,)):
    """Encode new images of ``folder`` into the set ``name`` on ``dsn``; returns ``(SyncResult, store)``."""
    folder = Path(folder)
    store = PostgresShieldStore(dsn, name or set_name(folder, vae_fingerprint, width, height, resize))
    result = SyncResult(repr(store))
    target = {"width": width, "height": height, "resize": resize}
    entries, others = scan(folder, allowed_roots)
    result.skipped.extend(others)
    if not rebuild and _unchanged(store, entries, others, vae_fingerprint, target, result):
        return result, store
    with store.writer(item_shape=item_shape, rebuild=rebuild, vae_fingerprint=vae_fingerprint, target=target,
                      thumbnail_size=thumbnail_size, shards=shards) as txn:
        txn.commit_rows = commit_rows
        if txn.body["vae_fingerprint"] != vae_fingerprint or txn.body["target"] != target:
            raise ValueError(f"{store} was built for another VAE or size ({txn.body['target']}); rebuild it")
        if tuple(txn.item_shape) != tuple(item_shape):
            raise ValueError(f"{store} holds shields of shape {txn.item_shape}, not {tuple(item_shape)}; rebuild it")
        apply_folder(txn, entries, encode, width, height, resize, batch_size, thumbnail_size, result, progress,
                     interrupted)
    if result.skipped:
        LOG.warning("Shield Set Loader: %s", result.summary())
    return result, store


def _unchanged(store: PostgresShieldStore, entries, others, vae_fingerprint: str, target: dict,
               result: SyncResult) -> bool:
    """True (and ``result`` filled) when the set already lists exactly these files with these stats."""
    with connect(store.dsn) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        if not conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{store.schema}.meta",)).fetchone()[0]:
            return False
        meta = read_meta(conn, store.schema)
        stored = {r[0]: (r[1], r[2]) for r in conn.execute(f"SELECT source, size, mtime_ns FROM {store.schema}.items")}
    if meta["vae_fingerprint"] != vae_fingerprint or meta["target"] != target:
        return False
    old_bad = {s["source"]: (s["size"], s["mtime_ns"]) for s in meta["skipped"]}
    images = {e.source: (e.size, e.mtime_ns) for e in entries}
    now = {**{o["source"]: (o["size"], o["mtime_ns"]) for o in others}, **images}
    if any(now.get(source) != stat for source, stat in old_bad.items()):
        return False
    if any(o["source"] not in old_bad for o in others):
        return False
    if {k: v for k, v in images.items() if k not in old_bad} != stored:
        return False
    result.kept = len(stored)
    result.skipped = list(meta["skipped"])
    return True
