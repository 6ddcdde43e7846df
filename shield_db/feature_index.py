"""Range screen on projected features, returning a candidate superset of the true hits.

The features live in a ``faiss.IndexFlatL2`` (its on-disk format); the range screen reads them in place and
runs in two passes, both batched matrix products over all queries of a batch:

1. coarse: the first ``COARSE_DIM`` coordinates plus the norm of the rest (:func:`coarse_features`), a
   1-Lipschitz image of the features, so coarse distances never exceed feature distances;
2. full: the survivors' full features.

One matrix product per pass reads the features once per batch (FAISS's range search reads them once per
query below 20 queries), and the coarse pass reads ``COARSE_DIM + 1`` of ``k + 1`` numbers per row.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np
from safetensors.numpy import load

from .errors import CorruptDatabaseError
from .projection import FEATURE_REL_ERROR, features, search_radius_sq
from .storage import write_bytes_atomic, write_safetensors_atomic

COARSE_DIM = 32
SCREEN_CHUNK_ROWS = 65536


def coarse_features(feats: np.ndarray, m: int) -> np.ndarray:
    """``[f_1..f_m, ||f_(m+1..)||]`` float32 of features ``[n, k+1]``.

    1-Lipschitz: ``||c(f) - c(g)||^2 = ||f_h - g_h||^2 + (||f_t|| - ||g_t||)^2 <= ||f - g||^2``. Computed in
    float64 and rounded once, ``||c^(f^) - c(f)|| <= ||f^ - f|| + 2^-23 ||f||`` (inside ``FEATURE_REL_ERROR``).
    """
    tail = np.sqrt(np.square(feats[:, m:], dtype=np.float64).sum(1))
    return np.concatenate([feats[:, :m], tail[:, None].astype(np.float32)], 1)


def squared_norms(feats: np.ndarray) -> np.ndarray:
    """``||f_i||^2`` summed in float64, rounded once to float32 (relative error <= 2^-24)."""
    return np.square(feats, dtype=np.float64).sum(1).astype(np.float32)


def screen(queries: np.ndarray, rows: np.ndarray, rows_sq: np.ndarray, r2: float) -> np.ndarray:
    """Sorted ``i`` with ``fl(||r_i||^2 - 2 q_b.r_i + ||q_b||^2) <= r2`` for some query ``b`` (float32).

    Error of that float32 value vs ``||q_b - r_i||^2``: the dot product ``<= gamma_k |q||r|``, the rounded
    squared norms ``<= 2^-24`` each, two additions ``<= 2^-24`` of at most ``2(||q||^2 + ||r||^2)`` each: in
    all ``<= 2 gamma_{k+3} (||q||^2 + ||r||^2)``, the same bound as FAISS's, which
    :func:`shield_db.projection.search_radius_sq` already enlarges ``r2`` by (twice).
    """
    q_sq = squared_norms(queries)[:, None]
    found = []
    for lo in range(0, len(rows), SCREEN_CHUNK_ROWS):
        block = rows[lo:lo + SCREEN_CHUNK_ROWS]
        d2 = queries @ block.T
        d2 *= -2
        d2 += rows_sq[lo:lo + len(block)]
        d2 += q_sq
        found.append(lo + np.flatnonzero((d2 <= np.float32(r2)).any(0)))
    return np.concatenate(found) if found else np.zeros(0, np.int64)


class FeatureIndex:
    """Features of every stored row (dead rows included) in a ``faiss.IndexFlatL2``, plus the map ``f``."""

    def __init__(self, mu: np.ndarray, a: np.ndarray, index: faiss.Index, max_norm: float):
        self.mu, self.a, self.index, self.max_norm = mu, a, index, float(max_norm)
        self._screen_arrays = None  # (features view, their squared norms, coarse features, theirs): built lazily

    @classmethod
    def empty(cls, mu: np.ndarray, a: np.ndarray) -> "FeatureIndex":
        return cls(mu, a, faiss.IndexFlatL2(a.shape[1] + 1), 0.0)

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    def add(self, x: np.ndarray) -> None:
        """Append the features of rows ``x [n, ...]``."""
        feats, norms = features(x, self.mu, self.a)
        self.index.add(np.ascontiguousarray(feats))
        self._screen_arrays = None  # the index may have moved its storage
        if len(norms):
            self.max_norm = max(self.max_norm, float(norms.max()))

    def candidates(self, queries: np.ndarray, radius: float) -> np.ndarray:
        """Sorted rows whose features lie close enough that they may be within ``radius`` of a query."""
        feats, norms = features(queries, self.mu, self.a)
        max_feat_sq = (self.max_norm * (1 + FEATURE_REL_ERROR)) ** 2
        r2 = max(search_radius_sq(radius, float(n), self.max_norm, float((n * (1 + FEATURE_REL_ERROR)) ** 2),
                                  max_feat_sq, feats.shape[1]) for n in norms)
        full, full_sq, coarse, coarse_sq = self.screen_arrays()
        if coarse is None:
            return screen(feats, full, full_sq, r2).astype(np.int64)
        rows = screen(coarse_features(feats, COARSE_DIM), coarse, coarse_sq, r2)
        return rows[screen(feats, full[rows], full_sq[rows], r2)].astype(np.int64)

    def screen_arrays(self) -> tuple:
        """The stored features (a view into the FAISS index), their squared norms, and the coarse pass's arrays
        (``None`` when the features are too short for two passes to pay)."""
        if self._screen_arrays is None:
            n, d = self.rows, self.index.d
            full = faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)
            chunks = range(0, n, SCREEN_CHUNK_ROWS)
            full_sq = np.concatenate([squared_norms(full[lo:lo + SCREEN_CHUNK_ROWS]) for lo in chunks]
                                     or [np.zeros(0, np.float32)])
            coarse = coarse_sq = None
            if d > 2 * (COARSE_DIM + 1):
                coarse = np.concatenate([coarse_features(full[lo:lo + SCREEN_CHUNK_ROWS], COARSE_DIM) for lo in chunks]
                                        or [np.zeros((0, COARSE_DIM + 1), np.float32)])
                coarse_sq = np.concatenate([squared_norms(coarse[lo:lo + SCREEN_CHUNK_ROWS]) for lo in chunks]
                                           or [np.zeros(0, np.float32)])
            self._screen_arrays = (full, full_sq, coarse, coarse_sq)
        return self._screen_arrays

    def nearest_candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
        """``[B, k]`` rows nearest in feature space (a cheap upper bound for the exact nearest search)."""
        feats, _ = features(queries, self.mu, self.a)
        _, ids = self.index.search(np.ascontiguousarray(feats), min(k, self.rows))
        return ids

    def save(self, folder: Path, file_id: int) -> dict:
        """Write ``basis-<id>.safetensors`` and ``features-<id>.faiss`` atomically; returns their manifest entry.

        The FAISS index is serialized in memory and written by :func:`write_bytes_atomic` (every byte checked
        before the rename): ``faiss.write_index`` loses a full disk's error when it closes the file.
        """
        folder.mkdir(parents=True, exist_ok=True)
        basis = folder / f"basis-{file_id:06d}.safetensors"
        basis_sha = write_safetensors_atomic(basis, {"mu": self.mu, "a": self.a}, {"format": "shield_db-basis"})
        feats = folder / f"features-{file_id:06d}.faiss"
        feats_sha = write_bytes_atomic(feats, faiss.serialize_index(self.index))
        return {"basis": {"file": f"index/{basis.name}", "sha256": basis_sha},
                "faiss": {"file": f"index/{feats.name}", "sha256": feats_sha},
                "rows": self.rows, "dim": int(self.a.shape[1]), "max_norm": self.max_norm}

    @classmethod
    def load(cls, database: Path, entry: dict) -> "FeatureIndex":
        """Read an index only after its bytes match the manifest's checksums (hash and parse the same bytes)."""
        data = {key: read_checked(database, database / entry[key]["file"], entry[key]["sha256"])
                for key in ("basis", "faiss")}
        path = database / entry["faiss"]["file"]
        try:
            basis = load(data["basis"])
            mu, a = basis["mu"], basis["a"]
            index = faiss.deserialize_index(np.frombuffer(data["faiss"], dtype=np.uint8))
        except Exception as exc:  # safetensors and FAISS raise their own types (RuntimeError, SafetensorError, ...)
            raise CorruptDatabaseError(database, path, f"unreadable index: {type(exc).__name__}: {exc}") from None
        if index.ntotal != entry["rows"] or index.d != a.shape[1] + 1 or a.shape[0] != mu.shape[0]:
            raise CorruptDatabaseError(database, path, f"holds {index.ntotal} rows of dim {index.d}, manifest "
                                                       f"says {entry['rows']} of dim {a.shape[1] + 1}")
        return cls(mu, a, index, entry["max_norm"])


def read_checked(database: Path, path: Path, sha256: str) -> bytes:
    """The bytes of ``path`` if their sha256 is ``sha256``, else :class:`CorruptDatabaseError` naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptDatabaseError(database, path, "missing") from None
    except OSError as exc:
        raise CorruptDatabaseError(database, path, f"unreadable: {exc}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptDatabaseError(database, path, "checksum does not match the manifest")
    return data
