"""Scattered rows of a shard by positioned reads: no readahead, several requests in flight, few open files.

A range query verifies a few thousand rows spread over gigabytes. Through a memory map the kernel reads
ahead ~128 KiB around every 8 KiB row, and page faults are taken one at a time under the GIL: on a cold
page cache that costs seconds (``BENCHMARKS.md``, section shield-db). ``os.preadv`` reads exactly the rows
straight into the output array and releases the GIL, so a few threads keep the disk queue busy.

A shard holds one descriptor (latents and thumbnails share it), opened when the snapshot is taken: a later
writer may delete the file, and a snapshot keeps reading the version it checked.
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


class OpenFile:
    """One read-only descriptor of a database file, checked to be the version that was verified."""

    def __init__(self, path, database, identity: tuple):
        self.path, self.database = str(path), database
        self._lock = threading.Lock()  # only for platforms without preadv (seek + read)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise CorruptDatabaseError(database, path, f"unreadable: {exc}") from None
        st = os.fstat(self.fd)
        if (st.st_dev, st.st_ino, st.st_size) != tuple(identity):
            self.close()
            raise CorruptDatabaseError(database, path, "replaced while it was being opened")

    def close(self) -> None:
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            os.close(fd)

    __del__ = close

    def read_into(self, target: memoryview, offset: int) -> int:
        """Fill ``target`` from byte ``offset``; returns the bytes read (fewer only at end of file)."""
        if hasattr(os, "preadv"):
            return _pread_into(self.fd, target, offset)
        with self._lock:
            return _pread_into(self.fd, target, offset)


class RowReader:
    """Rows of a ``[rows, ...]`` tensor stored at byte ``offset`` of an :class:`OpenFile`."""

    def __init__(self, file: OpenFile, offset: int, shape: tuple, dtype):
        self.file, self.offset = file, int(offset)
        self.path, self.database = file.path, file.database
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

    @property
    def _fd(self):
        return self.file.fd

    def _read_runs(self, buffer: memoryview, positions: list, starts: list, counts: list) -> None:
        for pos, start, count in zip(positions, starts, counts):
            want = count * self.row_bytes
            target = buffer[pos * self.row_bytes:pos * self.row_bytes + want]
            try:
                got = self.file.read_into(target, self.offset + start * self.row_bytes)
            except OSError as exc:
                raise CorruptDatabaseError(self.database, self.path, f"read error at row {start}: {exc}") from None
            if got != want:
                raise CorruptDatabaseError(self.database, self.path, f"read {got} of {want} bytes at row {start}: "
                                                                     "truncated after it was opened")

    def _read_cached(self, buffer: memoryview, positions: list, starts: list, counts: list) -> list:
        """Read the runs the page cache already holds, in this thread (``RWF_NOWAIT``); indices of the rest.

        A warm read then costs one system call per run and no thread hand-off (which costs more than the copy
        for small rows); runs that would wait for the disk (``EAGAIN``), come back short, or a file system
        without ``RWF_NOWAIT`` go to the blocking path, which re-reads them whole and reports real errors.
        """
        left = []
        fd, size, base, nowait = self._fd, self.row_bytes, self.offset, os.RWF_NOWAIT
        for i, (pos, start, count) in enumerate(zip(positions, starts, counts)):
            want = count * size
            try:
                got = os.preadv(fd, [buffer[pos * size:pos * size + want]], base + start * size, nowait)
            except BlockingIOError:
                got = -1
            except OSError:  # RWF_NOWAIT unsupported here (EOPNOTSUPP, EINVAL): everything left blocks
                return left + list(range(i, len(positions)))
            if got != want:
                left.append(i)
        return left

    def read_all(self) -> np.ndarray:
        """The whole tensor, as a new array (one sequential read)."""
        out = np.empty(self.shape, dtype=self.dtype)
        if out.nbytes:
            self._read_runs(memoryview(out.reshape(-1).view(np.uint8)), [0], [0], [self.shape[0]])
        return out

    def read(self, rows: np.ndarray) -> np.ndarray:
        """``tensor[rows]`` for sorted in-range ``rows``, as a new array."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if len(rows) == 0 or self.row_bytes == 0:
            return out
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        first, lengths = consecutive_runs(rows)
        runs = (first.tolist(), rows[first].tolist(), lengths.tolist())
        if len(first) >= PARALLEL_MIN_RUNS and hasattr(os, "RWF_NOWAIT"):
            left = self._read_cached(buffer, *runs)
            runs = tuple([r[i] for i in left] for r in runs)
        if len(runs[0]) < PARALLEL_MIN_RUNS or not hasattr(os, "preadv"):
            self._read_runs(buffer, *runs)
            return out
        parts = np.linspace(0, len(first), READ_THREADS + 1).astype(np.int64)
        jobs = [_pool().submit(self._read_runs, buffer, *(r[lo:hi] for r in runs))
                for lo, hi in zip(parts[:-1], parts[1:]) if hi > lo]
        for job in jobs:
            job.result()
        return out


def _pread_into(fd: int, target: memoryview, offset: int) -> int:
    """Fill ``target`` from ``offset``; returns the bytes read (fewer only at end of file)."""
    done = 0
    while done < len(target):
        if hasattr(os, "preadv"):
            count = os.preadv(fd, [target[done:]], offset + done)
        else:  # Windows: seek + read under OpenFile's lock
            os.lseek(fd, offset + done, os.SEEK_SET)
            count = os.readv(fd, [target[done:]]) if hasattr(os, "readv") else _read_into(fd, target[done:])
        if count <= 0:
            break
        done += count
    return done


def _read_into(fd: int, target: memoryview) -> int:
    data = os.read(fd, len(target))
    target[:len(data)] = data
    return len(data)
