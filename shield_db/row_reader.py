"""Scattered rows of a shard by positioned reads: no readahead, several requests in flight.

A range query verifies a few thousand rows spread over gigabytes. Through a memory map the kernel reads
ahead ~128 KiB around every 8 KiB row, and page faults are taken one at a time under the GIL: on a cold
page cache that costs seconds (``BENCHMARKS.md``, section shield-db). ``os.preadv`` reads exactly the rows
straight into the output array and releases the GIL, so a few threads keep the disk queue busy.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import CorruptDatabaseError

READ_THREADS = 16
PARALLEL_MIN_RUNS = 64
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="shield_db-read")
        return _POOL


def consecutive_runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first index, length)`` of each run of consecutive values in sorted ``rows``."""
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first = np.concatenate([[0], np.nonzero(np.diff(rows) != 1)[0] + 1])
    return first, np.diff(np.concatenate([first, [len(rows)]]))


class RowReader:
    """Rows of ``array`` (a memory map of ``path`` at ``offset``) read with ``os.preadv`` where it exists."""

    def __init__(self, path, database, array: np.memmap):
        self.path, self.database, self.array = str(path), database, array
        self.offset = int(array.offset)
        self.row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY) if hasattr(os, "preadv") else None

    def __del__(self):
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def _read_runs(self, buffer: memoryview, positions: list, starts: list, counts: list) -> None:
        for pos, start, count in zip(positions, starts, counts):
            want = count * self.row_bytes
            got = os.preadv(self._fd, [buffer[pos * self.row_bytes:pos * self.row_bytes + want]],
                            self.offset + start * self.row_bytes)
            if got != want:
                raise CorruptDatabaseError(self.database, self.path, f"read {got} of {want} bytes at row {start}: "
                                                                     "truncated after it was opened")

    def read(self, rows: np.ndarray) -> np.ndarray:
        """``array[rows]`` for sorted in-range ``rows``, as a new array."""
        if self._fd is None:
            return np.asarray(self.array[rows])
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=self.array.dtype)
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        first, lengths = consecutive_runs(rows)
        runs = (first.tolist(), rows[first].tolist(), lengths.tolist())
        if len(first) < PARALLEL_MIN_RUNS:
            self._read_runs(buffer, *runs)
            return out
        parts = np.linspace(0, len(first), READ_THREADS + 1).astype(np.int64)
        jobs = [_pool().submit(self._read_runs, buffer, *(r[lo:hi] for r in runs))
                for lo, hi in zip(parts[:-1], parts[1:]) if hi > lo]
        for job in jobs:
            job.result()
        return out
