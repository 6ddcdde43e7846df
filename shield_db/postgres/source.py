"""A PostgreSQL shield set as a shield source (``guidance.shields.ShieldSource``): exact, fail-closed, one snapshot.

Range search, per batch of queries:

1. features ``f(q)`` (:mod:`shield_db.projection`) and the feature radius ``rho = r + e_q + e_max`` every true hit
   stays within (the stored features' rounding bound);
2. the cells some ball can touch (:mod:`shield_db.postgres.cells`, triangle inequality on stored radii);
3. one SQL query over those cells' partitions (pruned; remote ones scanned in parallel by postgres_fdw) with the
   exact feature filter ``distance <= rho`` widened by the server's own rounding bound -- never an approximate
   index;
4. the candidates' fp16 latents verified in float64 in Python, with the acceptance of :mod:`shield_db.source`.

Everything is read in one REPEATABLE READ READ ONLY transaction opened when the source is created: the whole run
sees one committed state. Any failure (a server down, a partition missing, a query cancelled) raises
:class:`ShieldQueryError`; no failure ever reads as "no shield nearby".
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..exact import keep_nearest, squared_distances, within_any
from ..projection import features
from ..source import MAX_HITS, IndexedSource
from .cells import reach, sql_limit, touched_cells
from .errors import ShieldQueryError, require_psycopg
from .store import read_basis, read_meta

NEAREST_PROBE = 16
NEAREST_CHUNK_ROWS = 2048
SNAPSHOT_ATTEMPTS = 5


class PostgresShields(IndexedSource):
    """Every live shield of a :class:`~shield_db.postgres.store.PostgresShieldStore` in one snapshot."""

    def __init__(self, store, statement_timeout_ms: int = 0):
        self.store, self.s = store, store.schema
        self.conn = store.connect()
        try:
            for _ in range(SNAPSHOT_ATTEMPTS):
                self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                if statement_timeout_ms:
                    self.conn.execute(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}")
                self._load()
                if self.shards_match():
                    return
                self.conn.rollback()  # a commit landed between the coordinator's snapshot and a shard's: again
        except require_psycopg().Error as err:
            self.conn.close()
            raise ShieldQueryError(f"{store}: cannot open a snapshot: {err}") from None
        self.conn.close()
        raise ShieldQueryError(f"{store}: the shard servers kept changing while a snapshot was taken; try again")

    def shards_match(self) -> bool:
        """Every partition's commit stamp (read on its own server, opening its snapshot) equals the coordinator's."""
        want = int(self.meta.get("generation", 0))
        for part in range(int(self.meta["parts"])):
            got = self.conn.execute(f"SELECT generation FROM {self.s}.shields_p{part}_stamp").fetchone()
            if got is None or int(got[0]) != want:
                return False
        return True

    def _load(self) -> None:
        meta = read_meta(self.conn, self.s)
        self.meta, self.item_shape = meta, tuple(meta["item_shape"])
        self.feature_type, self.max_norm = meta["feature_type"], float(meta["max_norm"])
        self.basis = read_basis(self.conn, self.s)
        cells = self.conn.execute(f"SELECT cell, part, centre, radius FROM {self.s}.cells ORDER BY cell").fetchall()
        self.cell_ids = np.array([c[0] for c in cells], dtype=np.int64)
        self.cell_parts = np.array([c[1] for c in cells], dtype=np.int64)
        self.centres = np.array([c[2] for c in cells], dtype=np.float64).reshape(len(cells), -1)
        self.radii = np.array([c[3] for c in cells], dtype=np.float64)
        orphans = self.conn.execute(f"SELECT count(*) FROM {self.s}.blobs b WHERE NOT EXISTS "
                                    f"(SELECT 1 FROM {self.s}.cells c WHERE c.cell = b.cell)").fetchone()[0]
        if orphans:
            raise ShieldQueryError(f"{self.store}: {orphans} rows belong to no cell (the set was edited outside the "
                                   "pack); rebuild it")
        live = self.conn.execute(f"SELECT row, min(source) FROM {self.s}.items GROUP BY row ORDER BY row").fetchall()
        self.rows = np.array([r[0] for r in live], dtype=np.int64)
        self._live = set(self.rows.tolist())
        self._sources = [r[1] for r in live]

    def close(self) -> None:
        self.conn.close()

    def __len__(self) -> int:
        return len(self.rows)

    def _sql(self, query: str, params):
        try:
            return self.conn.execute(query, params).fetchall()
        except require_psycopg().Error as err:
            raise ShieldQueryError(f"{self.store}: shield search failed, so no protection result can be given "
                                   f"(a shard down or unreachable?): {str(err).strip()}") from None

    def _queries(self, queries: torch.Tensor) -> np.ndarray:
        q = queries.detach().to("cpu", torch.float32).reshape(queries.shape[0], -1)
        if q.shape[1] != math.prod(self.item_shape):
            raise ValueError(f"queries of shape {tuple(queries.shape[1:])} do not match shields of shape "
                             f"{self.item_shape}")
        if not torch.isfinite(q).all():
            raise ValueError("queries contain NaN or Inf")
        return q.numpy()

    def _candidates(self, q: np.ndarray, rho: np.ndarray):
        """``(rows, fp16 latents)`` of every stored shield whose feature lies within ``rho[b]`` of ``f(q_b)``."""
        mu, a = self.basis
        fq, _ = features(q, mu, a)
        touched = touched_cells(fq, rho, self.centres, self.radii)
        cells = self.cell_ids[touched]
        if len(cells) == 0:
            return np.zeros(0, np.int64), np.zeros((0, *self.item_shape), np.float16)
        parts = sorted(set(self.cell_parts[touched].tolist()))
        limits = sql_limit(rho, self.feature_type)
        dist = "cube_distance(feature, cube(%s::float8[]))" if self.feature_type == "cube" \
            else "(feature <-> %s::float4[]::vector)"
        where = " OR ".join([f"{dist} <= %s"] * len(fq))
        params = [parts, cells.tolist()]
        for f, lim in zip(fq, limits):
            params += [f.astype(np.float64).tolist(), float(lim)]
        query = f"SELECT row, latent FROM {self.s}.shields WHERE part = ANY(%s) AND cell = ANY(%s) AND ({where})"
        found = self._sql(query, params)
        rows = np.array([r[0] for r in found], dtype=np.int64)
        z = np.stack([np.frombuffer(r[1], dtype=np.float16) for r in found]) if found else np.zeros((0, 1), np.float16)
        keep = np.isin(rows, self.rows)  # rows no item uses (removed files) are not shields
        return rows[keep], z[keep].reshape(int(keep.sum()), *self.item_shape)

    def _rho(self, q: np.ndarray, radius) -> np.ndarray:
        mu, _ = self.basis
        qnorm = np.sqrt(((q.astype(np.float64) - mu) ** 2).sum(1))
        return reach(np.asarray(radius, dtype=np.float64), qnorm, self.max_norm)

    def within_rows(self, queries: torch.Tensor, radius: float, with_latents: bool = False):
        """Sorted live rows within ``radius`` (closed ball) of at least one query (and their fp16 latents)."""
        if not math.isfinite(radius) or radius < 0:
            raise ValueError(f"radius must be finite and >= 0, got {radius}")
        q = self._queries(queries)
        if len(self.rows) == 0 or self.basis is None or len(q) == 0:
            empty = np.zeros(0, np.int64)
            return (empty, np.zeros((0, *self.item_shape), np.float16)) if with_latents else empty
        rows, z = self._candidates(q, self._rho(q, radius))
        inside = within_any(torch.from_numpy(q).to(queries.device), z, radius)
        order = np.argsort(rows[inside], kind="stable")
        rows, z = rows[inside][order], z[inside][order]
        if len(rows) > MAX_HITS:
            raise ValueError(f"radius {radius} puts {len(rows)} shields (more than {MAX_HITS}) within reach of the "
                             f"queries; lower the radius")
        return (rows, z) if with_latents else rows

    def within(self, queries: torch.Tensor, radius: float) -> torch.Tensor:
        _, z = self.within_rows(queries, radius, with_latents=True)
        return torch.from_numpy(z.astype(np.float32)).to(queries.device)

    def nearest(self, queries: torch.Tensor, reach: float = math.inf):
        """Exact nearest live shield within ``reach`` (``(inf, -1)`` for a query with none): an upper bound per
        query from the nearest cells' best features, then one range search for the batch, each query within the
        smaller of its bound and ``reach`` (the union holds every query's own candidates)."""
        q = self._queries(queries)
        if len(self.rows) == 0:
            raise ValueError(f"{self.store} holds no shields: no nearest one")
        mu, a = self.basis
        fq, _ = features(q, mu, a)
        bounds = np.array([min(self._upper_bound(q[b:b + 1], fq[b]), reach) for b in range(len(q))])
        rows, z = self._candidates(q, self._rho(q, bounds))
        best, best_row = np.full(len(q), np.inf), np.full(len(q), -1, np.int64)
        for start in range(0, len(rows), NEAREST_CHUNK_ROWS):
            part = slice(start, start + NEAREST_CHUNK_ROWS)
            keep_nearest(best, best_row, rows[part], squared_distances(q, z[part]))
        beyond = best > reach * reach
        best[beyond], best_row[beyond] = np.inf, -1
        index = np.where(best_row >= 0, np.searchsorted(self.rows, best_row), -1)
        dist = torch.from_numpy(np.sqrt(best).astype(np.float32)).to(queries.device)
        return dist, torch.from_numpy(index).to(queries.device)

    def _upper_bound(self, q: np.ndarray, fq: np.ndarray) -> float:
        """A true distance to some live shield: best features of the cells nearest the query, verified exactly."""
        order = np.argsort(np.sqrt(((self.centres - fq) ** 2).sum(1)))
        dist = "cube_distance(feature, cube(%s::float8[]))" if self.feature_type == "cube" \
            else "(feature <-> %s::float4[]::vector)"
        for width in (1, 8, len(order)):
            cells = self.cell_ids[order[:width]]
            parts = sorted(set(self.cell_parts[order[:width]].tolist()))
            last = width == len(order)  # every cell: only live rows, so the nearest live one is found
            found = self._sql(f"SELECT row, latent FROM {self.s}.shields WHERE part = ANY(%s) AND cell = ANY(%s) "
                              + ("AND row = ANY(%s) " if last else "") + f"ORDER BY {dist} LIMIT {4 * NEAREST_PROBE}",
                              [parts, cells.tolist()] + ([self.rows.tolist()] if last else [])
                              + [fq.astype(np.float64).tolist()])
            found = [r for r in found if r[0] in self._live]  # rows of removed files are not shields
            if found:
                z = np.stack([np.frombuffer(r[1], dtype=np.float16) for r in found]).astype(np.float64)
                d = math.sqrt(float(((z - q.astype(np.float64)) ** 2).sum(1).min()))
                return d * (1 + 1e-6) + 1e-30
        raise ShieldQueryError(f"{self.store}: no stored latent found for {len(self.rows)} live shields")

    def latents(self, indices) -> torch.Tensor:
        rows = self.rows[np.asarray(indices, np.int64).reshape(-1)]
        got = dict(self._sql(f"SELECT row, latent FROM {self.s}.shields WHERE row = ANY(%s)", [rows.tolist()]))
        if len(set(rows.tolist()) - set(got)):
            raise ShieldQueryError(f"{self.store}: stored latents of rows {sorted(set(rows.tolist()) - set(got))[:5]} "
                                   "are missing")
        z = np.stack([np.frombuffer(got[int(r)], dtype=np.float16) for r in rows]) if len(rows) else \
            np.zeros((0, math.prod(self.item_shape)), np.float16)
        return torch.from_numpy(z.astype(np.float32).reshape(len(rows), *self.item_shape))

    def sources(self, indices) -> list[str]:
        return [self._sources[int(i)] for i in np.asarray(indices).reshape(-1)]

    @property
    def live_sources(self) -> list[str]:
        return list(self._sources)

    def thumbnails(self, indices) -> torch.Tensor | None:
        size = int(self.meta.get("thumbnail_size") or 0)
        rows = self.rows[np.asarray(indices, np.int64).reshape(-1)]
        if not size:
            return None
        got = dict(self._sql(f"SELECT row, thumbnail FROM {self.s}.shields WHERE row = ANY(%s)", [rows.tolist()]))
        if any(got.get(int(r)) is None for r in rows):
            return None
        return torch.from_numpy(np.stack([np.frombuffer(got[int(r)], np.uint8).reshape(size, size, 3)
                                          for r in rows])) if len(rows) else None
