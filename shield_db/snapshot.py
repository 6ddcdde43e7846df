"""The read side of a shield database: one committed manifest version, its shards held open for positioned
reads and its feature index (``shield_db/database.py`` has the layout)."""
from __future__ import annotations

import logging
import stat
import threading
from pathlib import Path

import numpy as np

from . import manifest
from .checksums import verified_sha256
from .errors import CorruptDatabaseError
from .feature_index import FeatureIndex
from .manifest import ROW, SOURCE
from .resident import ResidentRows
from .row_reader import OpenFile, RowReader
from .storage import read_safetensors_header, tensor_layout

LOG = logging.getLogger("shielded_sampling")
FEATURE_CHUNK_ROWS = 4096


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
        self._holding = None    # the thread filling held latents (hold_latents(wait=False))

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

    def hold_latents(self, budget: int, wait: bool = True) -> int:
        """Hold shards' latents in RAM, whole shards in order while they fit in ``budget`` bytes
        (:mod:`shield_db.resident`); returns the bytes planned. With ``wait=False`` a background thread fills them
        (:meth:`wait_held`) and searches read the shards until each copy is complete."""
        sizes = [shard.latent_reader.row_bytes * shard.rows for shard in self.shards]
        plan, planned = [], 0
        for shard, size in zip(self.shards, sizes):
            if planned + size > budget:
                break
            plan.append(shard)
            planned += size
        total = sum(sizes)
        if planned < total:
            LOG.info("shield_db: %s: %.0f of %.0f MB of latents held in RAM (budget %.0f MB); the rest are read at "
                     "each search", self.folder, planned / 2**20, total / 2**20, budget / 2**20)
        if wait:
            self._fill(plan)
        elif plan:
            self._holding = threading.Thread(target=self._fill, args=(plan,), name="shield_db-hold", daemon=True)
            self._holding.start()
        return planned

    def wait_held(self, timeout: float | None = None) -> bool:
        """Wait for a background :meth:`hold_latents`; True when it has finished."""
        if self._holding is not None:
            self._holding.join(timeout)
            return not self._holding.is_alive()
        return True

    def _fill(self, shards: list) -> None:
        for shard in shards:
            if isinstance(shard.latent_reader, ResidentRows):
                continue
            try:
                shard.latent_reader = ResidentRows(shard.latent_reader)
            except (CorruptDatabaseError, MemoryError) as exc:  # searches keep reading the shard, and report it there
                LOG.warning("shield_db: %s: latents not held in RAM: %s", self.folder, exc)
                return

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
