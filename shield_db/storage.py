"""Atomic files, checksums and memory-mapped safetensors shards (no pickle anywhere)."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .errors import CorruptDatabaseError

HASH_CHUNK_BYTES = 8 * 1024 * 1024
SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8, "I64": np.int64}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def sha256_file(path: Path) -> str:
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


def commit_temp(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` then rename it over ``path`` (atomic on POSIX and Windows)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    tmp.write_bytes(data)
    commit_temp(tmp, path)


def write_safetensors_atomic(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    tmp = temp_path(path)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
    commit_temp(tmp, path)


def read_safetensors_header(path: Path, database: Path) -> tuple[dict, int]:
    """Parse a safetensors header: ``(header dict, byte offset of the data section)``."""
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


def map_tensor(path: Path, database: Path, name: str) -> np.memmap:
    """Memory-map one tensor of a safetensors file read-only, checking dtype, shape and offsets."""
    header, data_start = read_safetensors_header(path, database)
    entry = header.get(name)
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        raise CorruptDatabaseError(database, path, f"tensor {name!r} missing or of unsupported dtype")
    dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
    shape = tuple(int(s) for s in entry["shape"])
    begin, end = (int(v) for v in entry["data_offsets"])
    if end - begin != int(np.prod(shape)) * dtype.itemsize or data_start + end > path.stat().st_size:
        raise CorruptDatabaseError(database, path, f"tensor {name!r} of shape {shape} does not fit the file")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def tensor_names(path: Path, database: Path) -> set[str]:
    header, _ = read_safetensors_header(path, database)
    return {k for k in header if k != "__metadata__"}
