"""A shield set stored in PostgreSQL: items, content hashes and fp16 latents as rows; commits are transactions.

Same semantics as the file database (:mod:`shield_db.database`): an item is ``[source, sha256, row, size,
mtime_ns]``, items with the same content share a row, removing an item keeps its row (re-adding the content costs no
VAE call) until :meth:`Transaction.reindex` drops rows no item uses. One writer at a time (a session advisory lock);
readers never wait (MVCC) and see whole commits only.

The projection basis and the cells are fitted on the first commit and refitted (every row rewritten, in one
transaction) whenever the set has grown :data:`REFIT_GROWTH` times since the last fit, up to
:data:`REFIT_MAX_ROWS` rows; exactness never depends on the fit, only pruning does.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time

import numpy as np

from ..manifest import MTIME, ROW, SHA, SIZE, SOURCE
from ..errors import DatabaseLockedError
from ..projection import FIT_SAMPLE_ROWS, features, fit_basis
from .errors import PostgresUnavailableError, ShieldQueryError, require_psycopg

require_psycopg()  # without psycopg: an error saying how to install it, before schema imports it
from . import schema as ddl  # noqa: E402
from .cells import assign, default_cell_count, kmeans  # noqa: E402

LOG = logging.getLogger("shielded_sampling")
FORMAT = "shield_db.postgres/1"
INDEX_DIM = 64
REFIT_GROWTH = 2
REFIT_MAX_ROWS = 1 << 18
CHUNK_ROWS = 2048
DEFAULT_COMMIT_ROWS = 256


def redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    return " ".join("password=***" if part.startswith("password=") else part for part in str(dsn).split())


def connect(dsn: str, **kwargs):
    psycopg = require_psycopg()
    try:
        return psycopg.connect(dsn, connect_timeout=10, **kwargs)
    except psycopg.Error as err:
        raise PostgresUnavailableError(f"cannot connect to PostgreSQL at {redact(dsn)}: {err}".strip()) from None


def feature_text(row: np.ndarray, feature_type: str) -> str:
    """Exact text of a float32 feature for COPY (shortest round-trip decimals)."""
    values = ",".join(repr(float(v)) for v in row)
    return f"({values})" if feature_type == "cube" else f"[{values}]"


class PostgresShieldStore:
    """Shield set ``name`` (schema ``shield_<name>``) on the server ``dsn``; remote partitions via postgres_fdw."""

    def __init__(self, dsn: str, name: str = "shields", lock_timeout: float = 600.0):
        self.dsn, self.name = dsn, ddl.check_name(name)
        self.schema = ddl.schema_of(name)
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"PostgreSQL shield set {self.name!r} at {redact(self.dsn)}"

    def connect(self, **kwargs):
        return connect(self.dsn, **kwargs)

    def exists(self) -> bool:
        with self.connect() as conn:
            return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{self.schema}.meta",)).fetchone()[0]

    def create(self, item_shape, vae_fingerprint: str = "", target: dict | None = None, thumbnail_size: int = 0,
               shards=(None,), feature_type: str | None = None) -> None:
        """Create the tables: one partition per entry of ``shards`` (``None``: on this server; a DSN: there)."""
        shards = list(shards) or [None]
        with self.connect() as conn:
            kind = feature_type or ddl.available_feature_type(conn)
            ddl.create_coordinator(conn, self.name, kind, INDEX_DIM + 1, len(shards))
            for part, shard in enumerate(shards):
                if shard is None:
                    ddl.attach_local_part(conn, self.name, part, kind, INDEX_DIM + 1)
                else:
                    with connect(shard, autocommit=True) as remote:
                        ddl.create_part_table(remote, self.schema, ddl.part_table(self.name, part), kind,
                                              INDEX_DIM + 1)
                    options = shard_options(shard)
                    ddl.attach_remote_part(conn, self.name, part, kind, INDEX_DIM + 1, f"{self.schema}_p{part}",
                                           options["server"], options["user"])
            meta = {"format": FORMAT, "item_shape": [int(s) for s in item_shape], "dtype": "float16",
                    "vae_fingerprint": vae_fingerprint, "target": target, "thumbnail_size": int(thumbnail_size),
                    "skipped": [], "feature_type": kind, "parts": len(shards), "max_norm": 0.0, "fitted_rows": 0,
                    "generation": 0}
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {self.schema}.meta VALUES (%s, %s)",
                                [(k, json.dumps(v)) for k, v in meta.items()])

    @contextlib.contextmanager
    def writer(self, item_shape=None, rebuild: bool = False, **create):
        """The one writer: creates the set if missing (``item_shape`` and ``create`` as :meth:`create`)."""
        if not self.exists():
            if item_shape is None:
                raise ValueError(f"{self} does not exist; give item_shape to create it")
            self.create(item_shape, **create)
        conn = self.connect()
        try:
            txn = Transaction(self, conn)
            if rebuild:
                txn.clear()
            yield txn
            txn.flush()
            txn.finish()
        finally:
            conn.close()  # ends the session: the advisory lock goes with it, uncommitted changes are rolled back

    def committed_state(self) -> str:
        """Changes with every commit (a counter in ``meta``); empty when the set does not exist."""
        with self.connect() as conn:
            if not conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{self.schema}.meta",)).fetchone()[0]:
                return ""
            row = conn.execute(f"SELECT value FROM {self.schema}.meta WHERE key = 'generation'").fetchone()
            return f"{self.schema}:{row[0] if row else 0}"

    def source(self, **kwargs):
        from .source import PostgresShields
        return PostgresShields(self, **kwargs)


def shard_options(dsn: str) -> dict:
    """postgres_fdw server and user-mapping options from a libpq DSN (``key=value`` pairs)."""
    psycopg = require_psycopg()
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    user = {k: str(params.pop(k)) for k in ("user", "password") if k in params}
    return {"server": {k: str(v) for k, v in params.items()}, "user": user}


def read_meta(conn, schema: str) -> dict:
    return {k: v for k, v in conn.execute(f"SELECT key, value FROM {schema}.meta")}


def read_basis(conn, schema: str):
    row = conn.execute(f"SELECT mu, a, rows, cols FROM {schema}.basis WHERE id = 1").fetchone()
    if row is None:
        return None
    mu = np.frombuffer(row[0], dtype=np.float64).copy()
    return mu, np.frombuffer(row[1], dtype=np.float64).reshape(row[2], row[3]).copy()


class Transaction:
    """Changes of the writer, committed every ``commit_rows`` new shields and at :meth:`flush` (one SQL transaction
    each). The same methods as :class:`shield_db.database.Transaction`, so ``shield_db.folder`` drives both."""

    def __init__(self, store: PostgresShieldStore, conn):
        self.store, self.conn, self.s = store, conn, store.schema
        self.commit_rows = DEFAULT_COMMIT_ROWS
        self._lock()
        self.body = read_meta(conn, self.s)
        self.item_shape = tuple(self.body["item_shape"])
        self.items = {r[0]: list(r) for r in conn.execute(
            f"SELECT source, sha256, row, size, mtime_ns FROM {self.s}.items")}
        self.row_of_sha = dict(conn.execute(f"SELECT sha256, row FROM {self.s}.blobs").fetchall())
        self.next_row = int(conn.execute(f"SELECT coalesce(max(row) + 1, 0) FROM {self.s}.blobs").fetchone()[0])
        conn.commit()
        self._new: list = []  # (row, sha, fp16 latent, thumbnail bytes | None)
        self._changed: set = set()  # sources whose item changed (upsert) or went (delete)

    def _lock(self) -> None:
        deadline = time.monotonic() + self.store.lock_timeout
        key = f"shield_db:{self.s}"
        while not self.conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()[0]:
            if time.monotonic() > deadline:
                raise DatabaseLockedError(f"{self.store}: another writer holds it for more than "
                                          f"{self.store.lock_timeout:.0f} s")
            time.sleep(0.2)

    # --- the interface shield_db.folder uses -------------------------------------------------------------------
    def item(self, source: str):
        return self.items.get(source)

    def sources(self) -> list[str]:
        return sorted(self.items)

    def row_of(self, sha: str):
        return self.row_of_sha.get(sha)

    def link(self, source: str, sha: str, row: int, size: int = 0, mtime_ns: int = 0) -> None:
        if row is None or self.row_of_sha.get(sha) != row:
            raise ValueError(f"row {row} does not hold content {sha[:12]}")
        self.items[source] = [source, sha, int(row), int(size), int(mtime_ns)]
        self._changed.add(source)

    def touch(self, source: str, size: int, mtime_ns: int) -> None:
        self.items[source][SIZE], self.items[source][MTIME] = int(size), int(mtime_ns)
        self._changed.add(source)

    def remove(self, source: str) -> bool:
        if self.items.pop(source, None) is None:
            return False
        self._changed.add(source)
        return True

    def add(self, source: str, sha: str, latent, thumbnail=None, size: int = 0, mtime_ns: int = 0) -> None:
        z = np.asarray(latent, dtype=np.float32)
        if tuple(z.shape) != self.item_shape:
            raise ValueError(f"latent of shape {tuple(z.shape)} does not match the set's item shape {self.item_shape}")
        if not np.isfinite(z).all() or not np.isfinite(z.astype(np.float16)).all():
            raise ValueError(f"latent of {source!r} has values that are not finite in float16")
        row = self.row_of_sha.get(sha)
        if row is None:
            row, self.next_row = self.next_row, self.next_row + 1
            thumb = None if thumbnail is None else np.ascontiguousarray(thumbnail, dtype=np.uint8).tobytes()
            self._new.append((row, sha, z.astype(np.float16), thumb))
            self.row_of_sha[sha] = row
        self.items[source] = [source, sha, row, int(size), int(mtime_ns)]
        self._changed.add(source)
        if len(self._new) >= self.commit_rows:
            self.flush()

    def add_batch(self, sources, shas, latents, thumbnails=None) -> None:
        for i, (source, sha) in enumerate(zip(sources, shas)):
            self.add(source, sha, latents[i], None if thumbnails is None else thumbnails[i])

    def set_skipped(self, skipped: list) -> None:
        self.body["skipped"] = list(skipped)
        self._changed.add(None)

    # --- commits --------------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit everything added or changed since the last commit, as one transaction."""
        if not self._new and not self._changed:
            return
        try:
            with self.conn.transaction():
                if self._new:
                    self._store_new()
                self._store_items()
                self._save_meta("skipped", "max_norm", "fitted_rows")
                self._next_generation()
        except Exception:
            self._reload_after_failure()
            raise
        self._new, self._changed = [], set()

    def _reload_after_failure(self) -> None:
        """Forget uncommitted changes (what is committed is what the database says)."""
        self.conn.rollback()
        self.__init__(self.store, self.conn)

    def _next_generation(self) -> None:
        """Count this commit, in ``meta`` and in every partition's stamp (on its own server), in this transaction."""
        self.body["generation"] = int(self.body.get("generation", 0)) + 1
        self._save_meta("generation")
        for part in range(int(self.body["parts"])):
            self.conn.execute(f"UPDATE {self.s}.{ddl.part_table(self.store.name, part)}_stamp SET generation = %s",
                              (self.body["generation"],))

    def _save_meta(self, *keys) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(f"UPDATE {self.s}.meta SET value = %s WHERE key = %s",
                            [(json.dumps(self.body[k]), k) for k in keys])

    def _store_items(self) -> None:
        sources = [s for s in self._changed if s is not None]
        with self.conn.cursor() as cur:
            cur.execute(f"DELETE FROM {self.s}.items WHERE source = ANY(%s)", (sources,))
            rows = [self.items[s] for s in sources if s in self.items]
            if rows:
                with cur.copy(f"COPY {self.s}.items (source, sha256, row, size, mtime_ns) FROM STDIN") as copy:
                    for it in rows:
                        copy.write_row((it[SOURCE], it[SHA], it[ROW], it[SIZE], it[MTIME]))

    def _store_new(self) -> None:
        basis = read_basis(self.conn, self.s)
        latents = np.stack([n[2] for n in self._new])
        if basis is None:
            basis, centres = self._fit(latents)
        else:
            centres = self._centres()
        self._insert(self._new, basis, centres)

    def _fit(self, sample: np.ndarray):
        """Fit the projection and the cells on ``sample`` and store them (an empty cell table is refilled)."""
        flat = sample.reshape(len(sample), -1)
        mu, a = fit_basis(flat[:FIT_SAMPLE_ROWS], INDEX_DIM)
        feats, _ = features(flat[:FIT_SAMPLE_ROWS], mu, a)
        total = len(self.row_of_sha)
        centres = kmeans(feats, default_cell_count(max(total, len(sample))))
        parts = int(self.body["parts"])
        self.conn.execute(f"DELETE FROM {self.s}.basis")
        self.conn.execute(f"INSERT INTO {self.s}.basis VALUES (1, %s, %s, %s, %s)",
                          (mu.tobytes(), np.ascontiguousarray(a).tobytes(), a.shape[0], a.shape[1]))
        self.conn.execute(f"DELETE FROM {self.s}.cells")
        with self.conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {self.s}.cells VALUES (%s, %s, %s, 0)",
                            [(c, c % parts, centres[c].tolist()) for c in range(len(centres))])
        self.body["fitted_rows"] = total
        self.body["max_norm"] = 0.0
        return (mu, a), centres

    def _centres(self) -> np.ndarray:
        rows = self.conn.execute(f"SELECT centre FROM {self.s}.cells ORDER BY cell").fetchall()
        return np.array([r[0] for r in rows], dtype=np.float64)

    def _insert(self, new: list, basis, centres: np.ndarray) -> None:
        """Features, cells and radii of ``new`` rows; rows go to their cell's partition (local or remote)."""
        mu, a = basis
        parts, kind = int(self.body["parts"]), self.body["feature_type"]
        latents = np.stack([n[2] for n in new])
        feats, norms = features(latents.reshape(len(new), -1), mu, a)
        cell, dist = assign(feats, centres)
        self.body["max_norm"] = max(float(self.body["max_norm"]), float(norms.max()) * (1 + 1e-12))
        grow = {}
        for c, d in zip(cell.tolist(), dist.tolist()):
            grow[c] = max(grow.get(c, 0.0), d)
        with self.conn.cursor() as cur:
            with cur.copy(f"COPY {self.s}.blobs (row, sha256, cell, part) FROM STDIN") as copy:
                for (row, sha, _, _), c in zip(new, cell.tolist()):
                    copy.write_row((row, sha, c, c % parts))
            with cur.copy(f"COPY {self.s}.shields (part, cell, row, feature, latent, thumbnail) FROM STDIN") as copy:
                for (row, _, z, thumb), c, f in zip(new, cell.tolist(), feats):
                    copy.write_row((c % parts, c, row, feature_text(f, kind), z.tobytes(), thumb))
            cur.executemany(f"UPDATE {self.s}.cells SET radius = greatest(radius, %s) WHERE cell = %s",
                            [(d, c) for c, d in grow.items()])

    # --- maintenance ----------------------------------------------------------------------------------------------
    def refit_owed(self) -> bool:
        fitted, rows = int(self.body["fitted_rows"]), len(self.row_of_sha)
        return fitted < REFIT_MAX_ROWS and rows > REFIT_GROWTH * max(fitted, 1) and rows > 1

    def finish(self) -> None:
        if self.refit_owed():
            self.reindex()

    def clear(self) -> None:
        """Forget every item and row (``rebuild``): one transaction."""
        with self.conn.transaction():
            for table in ("items", "blobs", "cells", "basis"):
                self.conn.execute(f"DELETE FROM {self.s}.{table}")
            self.conn.execute(f"DELETE FROM {self.s}.shields")
            self.body.update(skipped=[], max_norm=0.0, fitted_rows=0)
            self._save_meta("skipped", "max_norm", "fitted_rows")
            self._next_generation()
        self.__init__(self.store, self.conn)

    def reindex(self) -> None:
        """Refit basis and cells on a sample of the live rows, rewrite every live row, drop dead rows (one commit)."""
        live = sorted({it[ROW] for it in self.items.values()})
        with self.conn.transaction():
            sample_rows = np.random.default_rng(0).permutation(live)[:FIT_SAMPLE_ROWS].tolist() if live else []
            sample = self._read(sorted(sample_rows))
            self.conn.execute(f"DELETE FROM {self.s}.cells")
            self.conn.execute(f"DELETE FROM {self.s}.basis")
            live_set = set(live)
            dead = sorted(set(self.row_of_sha.values()) - live_set)
            self.conn.execute(f"DELETE FROM {self.s}.shields WHERE row = ANY(%s)", (dead,))
            self.conn.execute(f"DELETE FROM {self.s}.blobs WHERE row = ANY(%s)", (dead,))
            if live:
                self.row_of_sha = {sha: row for sha, row in self.row_of_sha.items() if row in live_set}
                basis, centres = self._fit(np.stack([s[2] for s in sample]))
                self.body["fitted_rows"] = len(live)
                for start in range(0, len(live), CHUNK_ROWS):
                    chunk = self._read(live[start:start + CHUNK_ROWS])
                    rows = [c[0] for c in chunk]
                    self.conn.execute(f"DELETE FROM {self.s}.shields WHERE row = ANY(%s)", (rows,))
                    self.conn.execute(f"DELETE FROM {self.s}.blobs WHERE row = ANY(%s)", (rows,))
                    self._insert(chunk, basis, centres)
            self._save_meta("max_norm", "fitted_rows")
            self._next_generation()

    def _read(self, rows: list) -> list:
        """``(row, sha, fp16 latent, thumbnail)`` of ``rows`` from the partitions."""
        if not rows:
            return []
        got = self.conn.execute(f"SELECT s.row, b.sha256, s.latent, s.thumbnail FROM {self.s}.shields s "
                                f"JOIN {self.s}.blobs b ON b.row = s.row WHERE s.row = ANY(%s) ORDER BY s.row",
                                (rows,)).fetchall()
        if len(got) != len(rows):
            raise ShieldQueryError(f"{self.store}: {len(rows) - len(got)} stored latents are missing")
        return [(r, sha, np.frombuffer(z, dtype=np.float16).reshape(self.item_shape), t) for r, sha, z, t in got]
