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
from pathlib import Path

from . import manifest
from .checksums import stat_key
from .errors import DatabaseLockedError, ReadOnlyDatabaseError, ShieldDatabaseError
from .lock import database_lock
from .snapshot import Snapshot
from .transaction import Transaction, check_index_dim, maintenance_owed, referenced_files

LOG = logging.getLogger("shielded_sampling")
_REFERENCED: dict[tuple, list] = {}


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
    def writer(self, item_shape=None, rebuild: bool = False, index_dim: int | None = None, **create):
        """Exclusive transaction. Creates the database (needs ``item_shape``) when absent or ``rebuild``.

        ``index_dim`` chooses the PCA directions of the search index and stores the choice, so later writers (the
        Shield Set Loader's syncs) keep it; the index is refitted when the writer finishes. Default: the stored
        choice, else :data:`~shield_db.transaction.DEFAULT_INDEX_DIM`.
        """
        if index_dim is not None:
            check_index_dim(index_dim)
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
                    f"for {int(size)} px (the ComfyUI and WebUI loaders use 48): build it with --thumbnail-size "
                    f"{body['thumbnail_size']}, or rebuild it to change the size")
            txn = Transaction(self.folder, body, index_dim=index_dim)
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
