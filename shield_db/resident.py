"""A set's latents held in RAM, up to a budget, so a search gathers its candidates instead of reading them.

A search reads a few hundred to a few thousand scattered rows per model evaluation. From the page cache each
costs one ``preadv`` (~1-2 us, most of the time of a 60k-shield search); after the host has loaded a model the
page cache may no longer hold them, and each becomes a disk read. Rows held in RAM cost a memory copy. The
copy is read once, through the descriptor the snapshot checked, so it is the version of the shard the snapshot
verified, and a later change to the file cannot reach it (the Shield Set Loader sees the change and loads the set
again). ``Snapshot.hold_latents`` fills it, for a searched set in a background thread: until a shard's copy is
complete, searches read that shard, with the same bytes.

The budget is per opened set, in MB: :data:`RESIDENT_MB_ENV` overrides :data:`DEFAULT_RESIDENT_MB`, 0 turns it
off. Shards are held in order while they fit; the rest are read from disk at each search.
"""
from __future__ import annotations

import os

import numpy as np

RESIDENT_MB_ENV = "SHIELDED_SAMPLING_RESIDENT_MB"
DEFAULT_RESIDENT_MB = 1024


def resident_budget() -> int:
    """Bytes of latents an opened set may hold in RAM (:data:`RESIDENT_MB_ENV`, else the default)."""
    text = os.environ.get(RESIDENT_MB_ENV, "").strip()
    if not text:
        return DEFAULT_RESIDENT_MB << 20
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(f"{RESIDENT_MB_ENV}={text!r}: expected a number of MB >= 0 (0 reads every search from "
                         f"disk); unset it for the default {DEFAULT_RESIDENT_MB}")
    return int(mb * (1 << 20))


class ResidentRows:
    """The rows of a ``RowReader`` held in RAM, with the reader's ``read`` (a new array each call)."""

    def __init__(self, reader):
        self.row_bytes = reader.row_bytes
        self.array = reader.read_all()
        self.array.flags.writeable = False

    def read(self, rows: np.ndarray) -> np.ndarray:
        """``tensor[rows]`` for sorted in-range ``rows``, as a new array."""
        return np.take(self.array, np.asarray(rows, dtype=np.int64), axis=0)
