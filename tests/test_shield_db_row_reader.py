"""shield_db.row_reader: scattered rows read exactly, whether the page cache holds them (RWF_NOWAIT in the
calling thread) or not (blocking reads in the pool), and when the file system refuses RWF_NOWAIT."""
import errno
import os

import numpy as np
import pytest

from shield_db.errors import CorruptDatabaseError
from shield_db.row_reader import PARALLEL_MIN_RUNS, OpenFile, RowReader

OFFSET = 24


def reader(tmp_path, rows=3000):
    data = np.random.default_rng(0).standard_normal((rows, 3, 5)).astype(np.float16)
    path = tmp_path / "rows.bin"
    path.write_bytes(b"x" * OFFSET + data.tobytes())
    st = path.stat()
    return RowReader(OpenFile(path, tmp_path, (st.st_dev, st.st_ino, st.st_size)), OFFSET, data.shape, data.dtype), data


def scattered(n):
    rows = np.sort(np.random.default_rng(1).choice(n, size=n // 5, replace=False))
    assert (np.diff(rows) > 1).sum() >= PARALLEL_MIN_RUNS
    return rows


def test_scattered_rows_equal_the_array(tmp_path):
    rr, data = reader(tmp_path)
    rows = scattered(len(data))
    assert np.array_equal(rr.read(rows), data[rows])
    assert np.array_equal(rr.read(rows[:5]), data[rows[:5]])


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="RWF_NOWAIT needs Linux preadv2")
@pytest.mark.parametrize("behaviour", ["would_block", "short", "unsupported"])
def test_rows_not_readable_without_blocking_are_read_by_the_pool(tmp_path, monkeypatch, behaviour):
    rr, data = reader(tmp_path)
    rows = scattered(len(data))
    real = os.preadv
    calls = {"nowait": 0, "blocking": 0}

    def fake(fd, buffers, offset, flags=0):
        if not flags:
            calls["blocking"] += 1
            return real(fd, buffers, offset)
        calls["nowait"] += 1
        if behaviour == "unsupported":
            raise OSError(errno.EOPNOTSUPP, "not supported")
        if calls["nowait"] % 2:  # every other run is "not cached"
            if behaviour == "would_block":
                raise BlockingIOError(errno.EAGAIN, "would block")
            view = memoryview(buffers[0])
            return real(fd, [view[:len(view) // 2]], offset, flags)  # half of it, garbage after
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", fake)
    assert np.array_equal(rr.read(rows), data[rows])
    assert calls["blocking"] > 0 and calls["nowait"] > 0
    if behaviour == "unsupported":
        assert calls["nowait"] == 1  # one refusal: the rest go straight to the blocking path


def test_truncated_file_is_still_an_error(tmp_path):
    rr, data = reader(tmp_path)
    os.truncate(tmp_path / "rows.bin", OFFSET + data[:2000].nbytes)
    with pytest.raises(CorruptDatabaseError, match="truncated"):
        rr.read(scattered(len(data)))
