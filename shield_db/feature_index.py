"""The stored features of a database (a ``faiss.IndexFlatL2``, its on-disk format) and their range screen.

The screen (:mod:`shield_db.cascade`) runs as a cascade of passes, each one folded matrix product over all
queries of a batch: first a prefix map of the leading coordinates over every row (a contiguous copy), then
wider prefixes and the full features on the survivors only (widths: :func:`screen_widths`). One product per pass
reads the features once per batch (FAISS's range search reads them once per query below 20 queries).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np
from safetensors.numpy import load

from .cascade import Cascade
from .errors import CorruptDatabaseError
from .projection import FEATURE_REL_ERROR, features, search_radius_sq
from .storage import write_bytes_atomic, write_safetensors_atomic

PREFIX_WIDTHS = (32, 128)   # candidate prefix levels of the cascade (docs/shield_db_real_images.md)
LEVEL_SHARE = 0.6           # a prefix level is used when its width (m + 1) is at most this share of the next one's


def screen_widths(width: int) -> tuple[int, ...]:
    """Prefix widths ``m`` of the cascade for stored features of ``width = k + 1`` numbers."""
    chosen, upper = [], width
    for m in sorted(PREFIX_WIDTHS, reverse=True):
        if m + 1 <= LEVEL_SHARE * upper:
            chosen.append(m)
            upper = m + 1
    return tuple(sorted(chosen))


class FeatureIndex:
    """Features of every stored row (dead rows included) in a ``faiss.IndexFlatL2``, plus the map ``f``."""

    def __init__(self, mu: np.ndarray, a: np.ndarray, index: faiss.Index, max_norm: float):
        self.mu, self.a, self.index, self.max_norm = mu, a, index, float(max_norm)
        self.widths = screen_widths(int(index.d))
        self._cascade = None  # the screen's arrays, built from the stored features when first searched

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
        self._cascade = None  # the index may have moved its storage
        if len(norms):
            self.max_norm = max(self.max_norm, float(norms.max()))

    def candidates(self, queries: np.ndarray, radius) -> np.ndarray:
        """Sorted rows whose features lie close enough that they may be within ``radius`` (scalar or ``[B]``) of a
        query."""
        feats, norms = features(queries, self.mu, self.a)
        return self.cascade().candidates(feats, self.screen_radii_sq(feats, norms, radius))

    def screen_radii_sq(self, feats: np.ndarray, norms: np.ndarray, radius) -> np.ndarray:
        """``[B]`` squared feature radii no true hit of each query can exceed, float bounds included."""
        max_feat_sq = (self.max_norm * (1 + FEATURE_REL_ERROR)) ** 2
        radii = np.broadcast_to(np.asarray(radius, np.float64), (len(norms),))
        norms = np.asarray(norms, np.float64)
        return search_radius_sq(radii, norms, self.max_norm, (norms * (1 + FEATURE_REL_ERROR)) ** 2, max_feat_sq,
                                feats.shape[1]).astype(np.float64)

    def cascade(self) -> Cascade:
        """The screen's arrays over the stored features (a view into the FAISS index, not a copy)."""
        if self._cascade is None or self._cascade.widths != self.widths:
            n, d = self.rows, self.index.d
            full = faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)
            self._cascade = Cascade(full, self.widths)
        return self._cascade

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
