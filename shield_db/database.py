"""A shield database folder: fp16 safetensors shards, a checksummed JSON manifest and a FAISS feature index.

Layout::

    <db>/manifest.json                 format, item shape, VAE fingerprint, target size, items, shard checksums
    <db>/shards/shard-<id>.safetensors "latents" fp16 [rows, *item_shape] (+ "thumbnails" uint8 [rows, t, t, 3])
    <db>/index/basis-<id>.safetensors  projection (mu, A) of :mod:`shield_db.projection`
    <db>/index/features-<id>.faiss     IndexFlatL2 over the projected features of every row
    <db>/lock                          writers hold it exclusively, readers shared
    <db>/verified.json                 sha256 verdicts per file version (``shield_db.checksums``), advisory

Rows are append-only and addressed by a global row number (shards in manifest order). An item is
``[source, sha256, row, size, mtime_ns]``; items with the same content share a row, rows no item uses are
kept in ``free_rows`` (re-adding that content costs no VAE call) until compaction drops them. Every change
writes files under new names and then the manifest (temp file + rename), so a killed build leaves the last
committed state; unreferenced files are removed by the next writer.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from . import manifest
from .checksums import verified_sha256
from .errors import CorruptDatabaseError, ShieldDatabaseError
from .feature_index import FeatureIndex
from .lock import database_lock
from .projection import FIT_SAMPLE_ROWS, fit_basis
from .row_reader import RowReader
from .storage import map_tensor, tensor_names, write_safetensors_atomic

LOG = logging.getLogger("shielded_sampling")
SOURCE, SHA, ROW, SIZE, MTIME = range(5)
DEFAULT_SHARD_ROWS = 65536
DEFAULT_COMMIT_ROWS = 256
DEFAULT_INDEX_DIM = 64
FEATURE_CHUNK_ROWS = 4096
MERGE_RUN = 8


class Shard:
    """One memory-mapped shard, checked against its manifest entry."""

    def __init__(self, folder: Path, entry: dict, item_shape: tuple, thumbnail_size: int, check_sha: bool = True):
        path = folder / entry["file"]
        if not path.is_file():
            raise CorruptDatabaseError(folder, path, "missing")
        if path.stat().st_size != entry["bytes"]:
            raise CorruptDatabaseError(folder, path, f"{path.stat().st_size} bytes, manifest says {entry['bytes']}"
                                                     " (truncated or replaced)")
        if check_sha and verified_sha256(path, folder) != entry["sha256"]:
            raise CorruptDatabaseError(folder, path, "checksum does not match the manifest")
        self.path, self.rows = path, int(entry["rows"])
        self.latents = map_tensor(path, folder, "latents")
        if self.latents.dtype != np.float16 or self.latents.shape != (self.rows, *item_shape):
            raise CorruptDatabaseError(folder, path, f"latents {self.latents.dtype} {self.latents.shape}, expected "
                                                     f"float16 {(self.rows, *item_shape)}")
        self.latent_reader = RowReader(path, folder, self.latents) if isinstance(self.latents, np.memmap) else None
        self.thumbnails = None
        if thumbnail_size and "thumbnails" in tensor_names(path, folder):
            self.thumbnails = map_tensor(path, folder, "thumbnails")


class Snapshot:
    """A consistent read-only view of the database (manifest + mapped shards + feature index)."""

    def __init__(self, folder: Path, body: dict, check_sha: bool = True, load_index: bool = True):
        self.folder, self.body = folder, body
        self.item_shape = tuple(body["item_shape"])
        self.shards = [Shard(folder, e, self.item_shape, body["thumbnail_size"], check_sha) for e in body["shards"]]
        self.offsets = np.cumsum([0] + [s.rows for s in self.shards])
        self.rows = int(self.offsets[-1])
        items = body["items"]
        bad = [it for it in items if not 0 <= int(it[ROW]) < self.rows]
        if bad:
            raise CorruptDatabaseError(folder, folder / manifest.MANIFEST_NAME, f"items point outside the {self.rows} rows: {bad[:3]}")
        self.live_rows = np.array(manifest.live_rows(body), dtype=np.int64)
        first_source = {}
        for it in items:
            first_source.setdefault(int(it[ROW]), it[SOURCE])
        self.live_sources = [first_source[int(r)] for r in self.live_rows]
        self.index = self._load_index() if load_index else None

    def _load_index(self):
        entry = self.body["index"]
        if entry is None:
            return None
        index = FeatureIndex.load(self.folder, entry)
        if index.rows > self.rows:
            raise CorruptDatabaseError(self.folder, self.folder / entry["faiss"]["file"],
                                       f"indexes {index.rows} rows but only {self.rows} are stored")
        for start in range(index.rows, self.rows, FEATURE_CHUNK_ROWS):  # an interrupted build: catch up in memory
            index.add(self.read_rows(np.arange(start, min(self.rows, start + FEATURE_CHUNK_ROWS))))
        return index

    def _gather(self, rows: np.ndarray, field: str, shape: tuple, dtype) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *shape), dtype=dtype)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.rows:
            raise IndexError(f"rows out of range [0, {self.rows}): {rows.min()}..{rows.max()}")
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard_of):
            pick = np.nonzero(shard_of == s)[0]
            local = rows[pick] - self.offsets[s]
            order = np.argsort(local, kind="stable")
            reader = self.shards[s].latent_reader if field == "latents" else None
            source = reader.read if reader is not None else getattr(self.shards[s], field).__getitem__
            out[pick[order]] = source(local[order])
        return out

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Stored latents (fp16) of global ``rows``."""
        return self._gather(rows, "latents", self.item_shape, np.float16)

    def read_thumbnails(self, rows: np.ndarray) -> np.ndarray | None:
        size = self.body["thumbnail_size"]
        if not size or any(s.thumbnails is None for s in self.shards):
            return None
        return self._gather(rows, "thumbnails", (size, size, 3), np.uint8)


class ShieldDatabase:
    """A database folder. Read with :meth:`snapshot`, change with :meth:`writer`."""

    def __init__(self, folder, lock_timeout: float = 600.0):
        self.folder = Path(folder)
        self.lock_timeout = lock_timeout

    def exists(self) -> bool:
        return manifest.exists(self.folder)

    def snapshot(self, check_sha: bool = True, load_index: bool = True) -> Snapshot:
        if not self.exists():
            raise ShieldDatabaseError(f"no shield database at {self.folder} (no {manifest.MANIFEST_NAME}); build it first")
        with database_lock(self.folder, exclusive=False, timeout=self.lock_timeout):
            return Snapshot(self.folder, manifest.load(self.folder), check_sha, load_index)

    @contextlib.contextmanager
    def writer(self, item_shape=None, rebuild: bool = False, **create):
        """Exclusive transaction. Creates the database (needs ``item_shape``) when absent or ``rebuild``."""
        with database_lock(self.folder, exclusive=True, timeout=self.lock_timeout):
            if rebuild or not self.exists():
                if item_shape is None:
                    raise ShieldDatabaseError(f"no shield database at {self.folder}: give item_shape to create one")
                for sub in ("shards", "index"):
                    (self.folder / sub).mkdir(parents=True, exist_ok=True)
                manifest.save(self.folder, manifest.new_body(item_shape, **create))
            body = manifest.load(self.folder)
            if item_shape is not None and tuple(body["item_shape"]) != tuple(item_shape):
                raise ShieldDatabaseError(f"shield database {self.folder} holds shields of shape {tuple(body['item_shape'])}, "
                                          f"not {tuple(item_shape)}; rebuild it for the new shape")
            txn = Transaction(self.folder, body)
            txn.remove_unreferenced_files()
            yield txn
            txn.finish()

    def create_if_missing(self, item_shape, **create) -> None:
        """Create an empty database unless one exists (nothing else is touched)."""
        if not self.exists():
            with self.writer(item_shape=item_shape, **create):
                pass


class Transaction:
    """Changes made under the writer lock; each :meth:`flush` is a crash-safe commit."""

    def __init__(self, folder: Path, body: dict, commit_rows: int = DEFAULT_COMMIT_ROWS,
                 shard_rows: int = DEFAULT_SHARD_ROWS, index_dim: int = DEFAULT_INDEX_DIM):
        self.folder, self.body = folder, body
        self.commit_rows, self.shard_rows, self.index_dim = commit_rows, shard_rows, index_dim
        self.item_shape = tuple(body["item_shape"])
        self._initial = manifest.canonical(body)
        self._pending = []  # (source, sha, latent fp16, thumbnail or None, size, mtime_ns)
        self._reindex_items()

    def _reindex_items(self) -> None:
        self._by_source = {it[SOURCE]: it for it in self.body["items"]}
        self._refs = Counter(int(it[ROW]) for it in self.body["items"])
        self._row_of_sha = dict(self.body["free_rows"])
        self._row_of_sha.update({it[SHA]: int(it[ROW]) for it in self.body["items"]})

    def _save(self) -> None:
        self.body["items"] = list(self._by_source.values())
        manifest.save(self.folder, self.body)

    # ---- queries
    def item(self, source: str):
        return self._by_source.get(source)

    def sources(self) -> list[str]:
        return list(self._by_source)

    def row_of(self, sha: str):
        return self._row_of_sha.get(sha)

    def rows(self) -> int:
        return manifest.row_count(self.body)

    # ---- changes
    def link(self, source: str, sha: str, row: int, size: int = 0, mtime_ns: int = 0) -> None:
        """Point ``source`` at an already stored row (same content): no encode."""
        self.remove(source)
        self.body["free_rows"].pop(sha, None)
        item = [source, sha, int(row), int(size), int(mtime_ns)]
        self._by_source[source] = item
        self._refs[int(row)] += 1
        self._row_of_sha[sha] = int(row)

    def touch(self, source: str, size: int, mtime_ns: int) -> None:
        """Record a new size/mtime for an item whose content hash did not change."""
        item = self._by_source[source]
        item[SIZE], item[MTIME] = int(size), int(mtime_ns)

    def remove(self, source: str) -> bool:
        item = self._by_source.pop(source, None)
        if item is None:
            return False
        row = int(item[ROW])
        self._refs[row] -= 1
        if self._refs[row] <= 0:
            del self._refs[row]
            self.body["free_rows"][item[SHA]] = row
        return True

    def add(self, source: str, sha: str, latent, thumbnail=None, size: int = 0, mtime_ns: int = 0) -> None:
        """Queue one encoded shield; committed by the next :meth:`flush` (automatic every ``commit_rows``)."""
        latent = np.asarray(latent, dtype=np.float32)
        if latent.shape != self.item_shape:
            raise ValueError(f"shield for {source!r} has shape {latent.shape}, database holds {self.item_shape}")
        if not np.isfinite(latent).all():
            raise ValueError(f"shield for {source!r} contains NaN or Inf")
        if np.abs(latent).max(initial=0) > 65504:
            raise ValueError(f"shield for {source!r} exceeds the float16 range (max |value| {np.abs(latent).max():.3g})")
        self.remove(source)
        self._pending.append((source, sha, latent.astype(np.float16), thumbnail, size, mtime_ns))
        if len(self._pending) >= self.commit_rows:
            self.flush()

    def add_batch(self, sources, shas, latents, thumbnails=None) -> None:
        """Queue many shields at once (e.g. synthetic data), checked as one array; flushes every ``commit_rows``."""
        latents = np.asarray(latents)
        if latents.shape[1:] != self.item_shape or len(latents) != len(sources) or len(sources) != len(shas):
            raise ValueError(f"add_batch got {len(sources)} sources, {len(shas)} hashes and latents of shape "
                             f"{latents.shape}; the database holds shields of shape {self.item_shape}")
        half = latents.astype(np.float16)
        if not np.isfinite(half).all():
            raise ValueError("add_batch: latents contain NaN or Inf, or exceed the float16 range")
        for i, (source, sha) in enumerate(zip(sources, shas)):
            self.remove(source)
            self._pending.append((source, sha, half[i], None if thumbnails is None else thumbnails[i], 0, 0))
            if len(self._pending) >= self.commit_rows:
                self.flush()

    def set_skipped(self, skipped: list) -> None:
        self.body["skipped"] = skipped

    def flush(self) -> None:
        """Write the queued shields as a new shard, then the manifest (the commit point)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        first = self.rows()
        tensors = {"latents": np.stack([p[2] for p in pending])}
        size = self.body["thumbnail_size"]
        if size:
            blank = np.zeros((size, size, 3), np.uint8)
            tensors["thumbnails"] = np.stack([blank if p[3] is None else np.asarray(p[3], np.uint8) for p in pending])
        self.body["shards"].append(self._write_shard(tensors))
        for i, (source, sha, _, _, st_size, mtime) in enumerate(pending):
            self.link(source, sha, first + i, st_size, mtime)
        self._save()

    def _write_shard(self, tensors: dict) -> dict:
        file_id = self.body["next_file_id"]
        self.body["next_file_id"] = file_id + 1
        path = self.folder / "shards" / f"shard-{file_id:06d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors_atomic(path, tensors, {"format": "shield_db-shard"})
        return {"file": f"shards/{path.name}", "rows": int(len(tensors["latents"])), "bytes": path.stat().st_size,
                "sha256": verified_sha256(path, self.folder)}

    # ---- finishing
    def finish(self) -> None:
        """Commit, merge small shards, compact if mostly dead, bring the feature index up to date."""
        self.flush()
        self.body["items"] = list(self._by_source.values())
        snap = Snapshot(self.folder, self.body, check_sha=True, load_index=False)
        dead = snap.rows - len(snap.live_rows)
        if dead > max(1024, len(snap.live_rows)):
            self._rewrite(snap, snap.live_rows, compact=True)
        else:
            self._merge_small_shards(snap)
        self._refresh_index()
        self.body["items"] = list(self._by_source.values())
        if manifest.canonical(self.body) != self._initial:  # an unchanged database is not rewritten
            self._save()
        self.remove_unreferenced_files()

    def _merge_small_shards(self, snap: Snapshot) -> None:
        """Merge the trailing run of small shards (commits append them) once it is ``MERGE_RUN`` long."""
        start = len(snap.shards)
        while start > 0 and snap.shards[start - 1].rows < self.shard_rows:
            start -= 1
        if len(snap.shards) - start >= MERGE_RUN:
            self._rewrite(snap, np.arange(int(snap.offsets[start]), snap.rows), compact=False, first_shard=start)

    def _rewrite(self, snap: Snapshot, rows: np.ndarray, compact: bool, first_shard: int = 0) -> None:
        """Copy ``rows`` into new full shards; ``compact`` renumbers rows (dead ones dropped)."""
        entries = []
        for start in range(0, len(rows), self.shard_rows):
            part = rows[start:start + self.shard_rows]
            tensors = {"latents": snap.read_rows(part)}
            thumbs = snap.read_thumbnails(part)
            if thumbs is not None:
                tensors["thumbnails"] = thumbs
            entries.append(self._write_shard(tensors))
        if compact:
            renumber = {int(r): i for i, r in enumerate(rows)}
            for it in self.body["items"]:
                it[ROW] = renumber[int(it[ROW])]
            self.body["free_rows"] = {}
            self.body["shards"] = entries
            self.body["index"] = None
        else:
            self.body["shards"] = self.body["shards"][:first_shard] + entries
        self._reindex_items()

    def _refresh_index(self) -> None:
        snap = Snapshot(self.folder, self.body, check_sha=False, load_index=False)
        entry = self.body["index"]
        if snap.rows < 2:
            self.body["index"] = None
            return
        stale = (entry is None or entry["dim"] != min(self.index_dim, entry.get("fit_rows", 0) - 1, int(np.prod(self.item_shape)))
                 or snap.rows >= 4 * entry["fit_rows"] and entry["fit_rows"] < FIT_SAMPLE_ROWS)
        if stale:
            index, fit_rows = self._fit_index(snap), min(snap.rows, FIT_SAMPLE_ROWS)
            start = 0
        else:
            index, fit_rows = FeatureIndex.load(self.folder, entry), entry["fit_rows"]
            start = index.rows
        if not stale and start == snap.rows:
            return
        for lo in range(start, snap.rows, FEATURE_CHUNK_ROWS):
            index.add(snap.read_rows(np.arange(lo, min(snap.rows, lo + FEATURE_CHUNK_ROWS))))
        file_id = self.body["next_file_id"]
        self.body["next_file_id"] = file_id + 1
        self.body["index"] = {**index.save(self.folder / "index", file_id), "fit_rows": fit_rows}

    def _fit_index(self, snap: Snapshot) -> FeatureIndex:
        rng = np.random.default_rng(0)
        pool = np.arange(snap.rows)
        sample = np.sort(rng.choice(pool, size=min(len(pool), FIT_SAMPLE_ROWS), replace=False))
        mu, a = fit_basis(snap.read_rows(sample).reshape(len(sample), -1), self.index_dim)
        return FeatureIndex.empty(mu, a)

    def remove_unreferenced_files(self) -> None:
        """Delete temp files and files no manifest entry references (left by a killed writer)."""
        keep = {e["file"] for e in self.body["shards"]}
        if self.body["index"]:
            keep |= {self.body["index"]["basis"]["file"], self.body["index"]["faiss"]["file"]}
        for sub in ("shards", "index"):
            for path in (self.folder / sub).glob("*") if (self.folder / sub).is_dir() else []:
                if f"{sub}/{path.name}" not in keep:
                    with contextlib.suppress(OSError):
                        os.remove(path)
        for path in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                os.remove(path)
