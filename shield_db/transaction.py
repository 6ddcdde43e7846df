"""The write side of a shield database: a transaction under the writer lock whose every flush is a crash-safe
commit, plus the maintenance a killed writer leaves owed (``shield_db/database.py`` has the layout)."""
from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from . import manifest
from .checksums import remember
from .feature_index import FeatureIndex
from .manifest import MTIME, ROW, SHA, SIZE, SOURCE
from .projection import FIT_SAMPLE_ROWS, fit_basis
from .snapshot import FEATURE_CHUNK_ROWS, Snapshot
from .storage import write_safetensors_atomic

LOG = logging.getLogger("shielded_sampling")
DEFAULT_SHARD_ROWS = 65536
DEFAULT_COMMIT_ROWS = 256
DEFAULT_INDEX_DIM = 128  # PCA directions; real images need more than 64 (docs/shield_db_real_images.md)
INDEX_DIM_KEY = "index_dim"  # manifest key of a directions count chosen for this database (kept by later writers)
INDEX_DIM_RANGE = (8, 1024)
MERGE_RUN = 8
MAINTENANCE = "maintenance_pending"  # manifest key: set by every commit before the last one of a writer


def referenced_files(body: dict) -> set[str]:
    keep = {e["file"] for e in body["shards"]}
    if body["index"]:
        keep |= {body["index"]["basis"]["file"], body["index"]["faiss"]["file"]}
    return keep


def unreferenced_files(folder: Path, body: dict) -> list[Path]:
    """Files a killed writer left: in shards/ and index/ but not in the manifest, and manifest temp files."""
    keep = referenced_files(body)
    found = [p for sub in ("shards", "index") if (folder / sub).is_dir() for p in (folder / sub).iterdir()
             if f"{sub}/{p.name}" not in keep]
    return found + list(folder.glob(f".{manifest.MANIFEST_NAME}.*.tmp"))


def check_index_dim(index_dim) -> None:
    """``index_dim`` must be a whole number of PCA directions in :data:`INDEX_DIM_RANGE`."""
    lo, hi = INDEX_DIM_RANGE
    if isinstance(index_dim, bool) or not isinstance(index_dim, int) or not lo <= index_dim <= hi:
        raise ValueError(f"index_dim (PCA directions of the search index) must be a whole number in [{lo}, {hi}], "
                         f"got {index_dim!r}; 128 is the default, 256 passes ~3x fewer candidates on real images "
                         f"for twice the index's memory")


def maintenance_owed(folder: Path, body: dict) -> bool:
    return bool(body.get(MAINTENANCE)) or bool(unreferenced_files(folder, body))


class Transaction:
    """Changes made under the writer lock; each :meth:`flush` is a crash-safe commit."""

    def __init__(self, folder: Path, body: dict, commit_rows: int = DEFAULT_COMMIT_ROWS,
                 shard_rows: int = DEFAULT_SHARD_ROWS, index_dim: int | None = None):
        self.folder, self.body = folder, body
        self.commit_rows, self.shard_rows = commit_rows, shard_rows
        # PCA directions of the index: asked for here (then stored, kept by later writers), else the stored choice
        self.index_dim = int(index_dim if index_dim is not None else body.get(INDEX_DIM_KEY, DEFAULT_INDEX_DIM))
        self.item_shape = tuple(body["item_shape"])
        self._initial = manifest.canonical(body)
        if index_dim is not None:
            self.body[INDEX_DIM_KEY] = self.index_dim  # a change of the body: saved when the writer finishes
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
            tensors["thumbnails"] = np.stack([self._thumbnail(p[0], p[3], size) for p in pending])
        self.body["shards"].append(self._write_shard(tensors))
        for i, (source, sha, _, _, st_size, mtime) in enumerate(pending):
            self.link(source, sha, first + i, st_size, mtime)
        self.body[MAINTENANCE] = True  # merge, index and cleanup are owed until finish() commits
        self._save()
        self._merge_as_you_go()

    @staticmethod
    def _thumbnail(source: str, thumb, size: int) -> np.ndarray:
        if thumb is None:
            return np.zeros((size, size, 3), np.uint8)
        thumb = np.asarray(thumb)
        if thumb.shape != (size, size, 3) or thumb.dtype != np.uint8:
            raise ValueError(f"thumbnail of {source!r} is {thumb.dtype} {thumb.shape}; this database stores uint8 "
                             f"({size}, {size}, 3) thumbnails (its thumbnail size is {size})")
        return thumb

    def _merge_as_you_go(self) -> None:
        """Merge the last ``MERGE_RUN`` small shards into one once none outweighs the rest (tiered merging).

        Commits of ``commit_rows`` then grow into shards of 8x, 64x, ... rows: at most ~7 small shards per
        tier stay open, so a build of any size keeps few files (and descriptors), each row copied ~log_8 times.
        """
        while len(self.body["shards"]) >= MERGE_RUN:
            tail = [int(e["rows"]) for e in self.body["shards"][-MERGE_RUN:]]
            if max(tail) >= self.shard_rows or tail[0] > sum(tail[1:]):
                return
            first = len(self.body["shards"]) - MERGE_RUN
            old = [e["file"] for e in self.body["shards"][first:]]
            snap = Snapshot(self.folder, self.body, check_sha=True, load_index=False)
            self._rewrite(snap, np.arange(int(snap.offsets[first]), snap.rows), compact=False, first_shard=first)
            del snap
            self._save()
            for name in old:  # readers holding an older snapshot keep their open descriptors
                with contextlib.suppress(OSError):
                    os.remove(self.folder / name)

    def _write_shard(self, tensors: dict) -> dict:
        file_id = self.body["next_file_id"]
        self.body["next_file_id"] = file_id + 1
        path = self.folder / "shards" / f"shard-{file_id:06d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        sha = write_safetensors_atomic(path, tensors, {"format": "shield_db-shard"})
        remember(path, sha)
        return {"file": f"shards/{path.name}", "rows": int(len(tensors["latents"])), "bytes": path.stat().st_size,
                "sha256": sha}

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
        self.body.pop(MAINTENANCE, None)
        if manifest.canonical(self.body) != self._initial:  # an unchanged database is not rewritten
            self._save()
        self.remove_unreferenced_files()

    def _merge_small_shards(self, snap: Snapshot) -> None:
        """At the end of a writer: fold a trailing run of >= MERGE_RUN / 2 small shards holding few rows into one.

        Bigger runs are already bounded by :meth:`_merge_as_you_go`; this keeps a small database in one file
        without copying much when a few images are added at a time.
        """
        start = len(snap.shards)
        while start > 0 and snap.shards[start - 1].rows < self.shard_rows:
            start -= 1
        run_rows = snap.rows - int(snap.offsets[start])
        if len(snap.shards) - start >= MERGE_RUN // 2 and run_rows <= self.shard_rows // MERGE_RUN:
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
        for path in unreferenced_files(self.folder, self.body) + list(self.folder.glob(".*.tmp")):
            with contextlib.suppress(OSError):
                os.remove(path)
