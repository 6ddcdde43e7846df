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
import hashlib
import json
import logging
import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np

from . import manifest
from .checksums import remember, stat_key, verified_sha256
from .errors import CorruptDatabaseError, DatabaseLockedError, ReadOnlyDatabaseError, ShieldDatabaseError
from .feature_index import FeatureIndex
from .lock import database_lock
from .projection import FIT_SAMPLE_ROWS, fit_basis
from .row_reader import OpenFile, RowReader
from .storage import read_safetensors_header, tensor_layout, write_safetensors_atomic

LOG = logging.getLogger("shielded_sampling")
SOURCE, SHA, ROW, SIZE, MTIME = range(5)
DEFAULT_SHARD_ROWS = 65536
DEFAULT_COMMIT_ROWS = 256
DEFAULT_INDEX_DIM = 128  # PCA directions; real images need more than 64 (docs/shield_db_real_images.md)
FEATURE_CHUNK_ROWS = 4096
MERGE_RUN = 8
_REFERENCED: dict[tuple, list] = {}
MAINTENANCE = "maintenance_pending"  # manifest key: set by every commit before the last one of a writer


class Shard:
    """One shard, checked against its manifest entry and held open (one descriptor) for positioned reads."""

    def __init__(self, folder: Path, entry: dict, item_shape: tuple, thumbnail_size: int, check_sha: bool = True):
        path = folder / entry["file"]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise CorruptDatabaseError(folder, path, "missing") from None
        except OSError as exc:
            raise CorruptDatabaseError(folder, path, f"unreadable: {exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptDatabaseError(folder, path, "missing (not a regular file)")
        if st.st_size != entry["bytes"]:
            raise CorruptDatabaseError(folder, path, f"{st.st_size} bytes, manifest says {entry['bytes']}"
                                                     " (truncated or replaced)")
        if check_sha and verified_sha256(path, folder, expected=entry["sha256"]) != entry["sha256"]:
            raise CorruptDatabaseError(folder, path, "checksum does not match the manifest")
        self.path, self.rows = path, int(entry["rows"])
        self.file = OpenFile(path, folder, (st.st_dev, st.st_ino, st.st_size))
        header = read_safetensors_header(path, folder)
        offset, shape, dtype = tensor_layout(path, folder, "latents", header)
        if dtype != np.float16 or shape != (self.rows, *item_shape):
            raise CorruptDatabaseError(folder, path, f"latents {dtype} {shape}, expected float16 {(self.rows, *item_shape)}")
        self.latent_reader = RowReader(self.file, offset, shape, dtype)
        self.thumbnail_reader = None
        if thumbnail_size and "thumbnails" in header[0]:
            offset, shape, dtype = tensor_layout(path, folder, "thumbnails", header)
            want = (self.rows, thumbnail_size, thumbnail_size, 3)
            if dtype != np.uint8 or shape != want:
                raise CorruptDatabaseError(folder, path, f"thumbnails {dtype} {shape}, the database's thumbnail size "
                                                         f"says uint8 {want}")
            self.thumbnail_reader = RowReader(self.file, offset, shape, dtype)


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
            reader = self.shards[s].latent_reader if field == "latents" else self.shards[s].thumbnail_reader
            out[pick[order]] = reader.read(local[order])
        return out

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Stored latents (fp16) of global ``rows``."""
        return self._gather(rows, "latents", self.item_shape, np.float16)

    def read_thumbnails(self, rows: np.ndarray) -> np.ndarray | None:
        size = self.body["thumbnail_size"]
        if not size or any(s.thumbnail_reader is None for s in self.shards):
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
            body = manifest.load(self.folder)
            if not maintenance_owed(self.folder, body):
                return Snapshot(self.folder, body, check_sha, load_index)
        self.finish_pending()  # a writer was killed after its last commit: finish its merge, index and cleanup
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
            size = create.get("thumbnail_size")
            if size is not None and int(size) != int(body["thumbnail_size"]):
                raise ShieldDatabaseError(
                    f"shield database {self.folder} stores thumbnails of {body['thumbnail_size']} px, this build asked "
                    f"for {int(size)} px (the Shield Set Loader uses 48): build it with --thumbnail-size "
                    f"{body['thumbnail_size']}, or rebuild it to change the size")
            txn = Transaction(self.folder, body)
            txn.remove_unreferenced_files()
            yield txn
            txn.finish()

    def finish_pending(self) -> bool:
        """Finish maintenance a killed writer owed (merge, index, cleanup); True if it ran.

        Skipped when another writer holds the lock (it will finish it) or the database cannot be written
        (read-only media: the committed state is complete and readable as it is).
        """
        if not self.exists():
            return False
        with database_lock(self.folder, exclusive=False, timeout=self.lock_timeout):
            owed = maintenance_owed(self.folder, manifest.load(self.folder))
        if not owed:
            return False
        try:
            with ShieldDatabase(self.folder, lock_timeout=0).writer():
                pass
        except DatabaseLockedError:
            return False
        except (OSError, ReadOnlyDatabaseError) as exc:
            LOG.warning("shield database %s: could not finish its maintenance (%s); using it as committed", self.folder, exc)
            return False
        return True

    def committed_state(self) -> str:
        """Changes when the manifest or any file it references changes (identity keys; nothing is hashed).

        The manifest is replaced (new inode and ctime) at every commit, so its own key stands for its content;
        the list of files it references is parsed once per manifest version.
        """
        path = self.folder / manifest.MANIFEST_NAME
        try:
            key = stat_key(path)
            files = _REFERENCED.get((str(path), *key))
            if files is None:
                body = json.loads(path.read_bytes())["body"]
                files = sorted(referenced_files(body))
                if len(_REFERENCED) >= 16:  # the loader asks about a few databases
                    _REFERENCED.pop(next(iter(_REFERENCED)))
                _REFERENCED[(str(path), *key)] = files
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"unreadable manifest: {exc}"
        digest = hashlib.sha256(f"{key}".encode())
        for name in files:
            try:
                digest.update(f"{name}:{stat_key(self.folder / name)}".encode())
            except OSError as exc:
                digest.update(f"{name}:{exc.errno}".encode())
        return digest.hexdigest()

    def create_if_missing(self, item_shape, **create) -> None:
        """Create an empty database unless one exists (nothing else is touched)."""
        if not self.exists():
            with self.writer(item_shape=item_shape, **create):
                pass


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


def maintenance_owed(folder: Path, body: dict) -> bool:
    return bool(body.get(MAINTENANCE)) or bool(unreferenced_files(folder, body))


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
