"""Atomic files, checksums and safetensors tensors read on demand (no pickle anywhere).

Writes never commit a short file: the bytes are written by this process (a short or failed ``write`` raises),
fsync'ed, and the file's size and sha256 are checked against what was meant to be written before the rename
that makes it visible (a full disk can otherwise leave a truncated file that a library reported as written).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
from .errors import CorruptDatabaseError

HASH_CHUNK_BYTES = 8 * 1024 * 1024
SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8, "I64": np.int64}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def sha256_file(path: Path, database: Path | None = None) -> str:
    """sha256 of a file; with ``database``, an OS error is reported as that database's corruption, naming the file."""
    try:
        return _sha256_file(path)
    except OSError as exc:
        if database is None:
            raise
        raise CorruptDatabaseError(database, path, f"unreadable: {exc}") from None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        count = os.write(fd, view[done:done + (1 << 30)])
        if count <= 0:
            raise OSError(errno.ENOSPC, "short write", "")
        done += count


def write_bytes_atomic(path: Path, data) -> str:
    """Write ``data`` so that only the complete bytes can ever appear at ``path``; returns their sha256."""
    return write_chunks_atomic(path, [data])


def write_chunks_atomic(path: Path, chunks) -> str:
    """Write the concatenated buffers ``chunks`` to ``path``, all or nothing; returns their sha256.

    temp file, every byte written (a short write raises), fsync, size and sha256 read back and compared,
    then rename + directory fsync. On any error the temp file is removed (freeing the space) and it propagates.
    """
    digest, size = hashlib.sha256(), 0
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                digest.update(view)
                _write_all(fd, view)
                size += len(view)
            os.fsync(fd)
        finally:
            os.close(fd)
        if tmp.stat().st_size != size or _sha256_file(tmp) != digest.hexdigest():
            raise OSError(errno.EIO, f"{tmp} does not hold the {size} bytes just written (disk full or failing?)")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)
    return digest.hexdigest()


def write_safetensors_atomic(path: Path, tensors: dict, metadata: dict | None = None) -> str:
    """Write ``tensors`` as a safetensors file with :func:`write_chunks_atomic` (no copy of the data); returns its sha256."""
    arrays = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
    header, offset = {}, 0
    for name, array in arrays.items():
        dtype = next((k for k, v in SAFETENSORS_DTYPES.items() if np.dtype(v) == array.dtype), None)
        if dtype is None:
            raise ValueError(f"cannot store {name!r} of dtype {array.dtype} (supported: {list(SAFETENSORS_DTYPES)})")
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return write_chunks_atomic(path, [struct.pack("<Q", len(text)), text, *(a.reshape(-1).view(np.uint8) for a in arrays.values())])


def read_safetensors_header(path: Path, database: Path) -> tuple[dict, int]:
    """Parse a safetensors header: ``(header dict, byte offset of the data section)``."""
    try:
        return _read_safetensors_header(path, database)
    except OSError as exc:
        raise CorruptDatabaseError(database, path, f"unreadable: {exc}") from None


def _read_safetensors_header(path: Path, database: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CorruptDatabaseError(database, path, "shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CorruptDatabaseError(database, path, f"header length {length} does not fit in {size} bytes")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptDatabaseError(database, path, f"unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptDatabaseError(database, path, "safetensors header is not an object")
    return header, 8 + length


def tensor_layout(path: Path, database: Path, name: str, header: tuple | None = None) -> tuple[int, tuple, np.dtype]:
    """``(byte offset, shape, dtype)`` of one tensor of a safetensors file, checked to fit the file."""
    try:
        header, data_start = header or read_safetensors_header(path, database)
        size = path.stat().st_size
    except OSError as exc:
        raise CorruptDatabaseError(database, path, f"unreadable: {exc}") from None
    entry = header.get(name)
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        raise CorruptDatabaseError(database, path, f"tensor {name!r} missing or of unsupported dtype")
    try:
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(v) for v in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CorruptDatabaseError(database, path, f"tensor {name!r} has a malformed header entry") from None
    if min(shape, default=0) < 0 or end - begin != int(np.prod(shape)) * dtype.itemsize or data_start + end > size:
        raise CorruptDatabaseError(database, path, f"tensor {name!r} of shape {shape} does not fit the file")
    return data_start + begin, shape, dtype


def read_tensor(path: Path, database: Path, name: str) -> np.ndarray:
    """One whole tensor of a safetensors file, read into memory (no file stays open)."""
    offset, shape, dtype = tensor_layout(path, database, name)
    out = np.empty(shape, dtype=dtype)
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            got = handle.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    except OSError as exc:
        raise CorruptDatabaseError(database, path, f"unreadable: {exc}") from None
    if got != out.nbytes:
        raise CorruptDatabaseError(database, path, f"read {got} of {out.nbytes} bytes of {name!r}")
    return out


def tensor_names(path: Path, database: Path) -> set[str]:
    header, _ = read_safetensors_header(path, database)
    return {k for k in header if k != "__metadata__"}
