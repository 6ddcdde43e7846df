"""Inter-process lock on a database folder: one writer at a time, readers share."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from .errors import DatabaseLockedError

POLL_SECONDS = 0.05

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


def _try_lock(handle, exclusive: bool) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        else:  # msvcrt has no shared locks: readers also take the exclusive byte lock, briefly
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _unlock(handle) -> None:
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    else:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


@contextlib.contextmanager
def database_lock(folder: Path, exclusive: bool, timeout: float = 600.0):
    """Hold ``<folder>/lock`` (exclusive for writers, shared for readers) or raise after ``timeout`` s."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / "lock", "a+b")
    try:
        deadline = time.monotonic() + timeout
        while not _try_lock(handle, exclusive):
            if time.monotonic() > deadline:
                raise DatabaseLockedError(
                    f"shield database {folder}: another process has held its lock for more than {timeout:.0f} s "
                    f"(pid file {folder / 'lock'}); wait for that build to finish or stop it")
            time.sleep(POLL_SECONDS)
        if exclusive:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()).encode())
            handle.flush()
        try:
            yield
        finally:
            _unlock(handle)
    finally:
        handle.close()
