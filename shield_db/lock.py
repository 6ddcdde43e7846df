"""Inter-process lock on a database folder: one writer at a time, readers share.

On read-only media (or a folder this process may not write) readers open an existing lock file read-only
(``flock`` works on it) or, when there is none, read without a lock: nobody can be writing there. Writers
get :class:`ReadOnlyDatabaseError`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

from .errors import DatabaseLockedError, ReadOnlyDatabaseError

POLL_SECONDS = 0.05
READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}

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


def _open_lock_file(folder: Path, exclusive: bool):
    """The lock file opened for locking, or ``None`` for a reader of a read-only database without one."""
    path = folder / "lock"
    try:
        if exclusive or not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
        return open(path, "a+b")
    except OSError as exc:
        if exc.errno not in READ_ONLY_ERRNOS:
            raise
        if exclusive:
            raise ReadOnlyDatabaseError(f"shield database {folder} cannot be written ({exc.strerror}): it is on "
                                        f"read-only media or you may not write there; copy it somewhere writable "
                                        f"to update it") from None
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def database_lock(folder: Path, exclusive: bool, timeout: float = 600.0):
    """Hold ``<folder>/lock`` (exclusive for writers, shared for readers) or raise after ``timeout`` s."""
    folder = Path(folder)
    handle = _open_lock_file(folder, exclusive)
    if handle is None:
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        while not _try_lock(handle, exclusive):
            if time.monotonic() >= deadline:
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
