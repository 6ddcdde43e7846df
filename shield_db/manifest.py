"""The JSON manifest: what the database holds, with its own checksum so any edit is detected."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .errors import CorruptDatabaseError
from .storage import write_bytes_atomic

FORMAT = "shield_db"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The fields of one manifest item ``[source, sha256, row, size, mtime_ns]``, named once for every module.
SOURCE, SHA, ROW, SIZE, MTIME = range(5)
REQUIRED_KEYS = ("format", "format_version", "item_shape", "latent_channels", "dtype", "shards", "items",
                 "free_rows", "skipped", "index", "next_file_id", "vae_fingerprint", "target", "thumbnail_size")


def new_body(item_shape, vae_fingerprint: str = "", target: dict | None = None, thumbnail_size: int = 0) -> dict:
    """An empty manifest body for shields of shape ``item_shape`` (latent channels first)."""
    item_shape = [int(s) for s in item_shape]
    if len(item_shape) < 1 or min(item_shape) < 1:
        raise ValueError(f"item_shape must be non-empty positive sizes, got {item_shape}")
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "item_shape": item_shape,
        "latent_channels": item_shape[0], "dtype": "float16", "vae_fingerprint": vae_fingerprint,
        "target": target, "thumbnail_size": int(thumbnail_size), "shards": [], "items": [], "free_rows": {},
        "skipped": [], "index": None, "next_file_id": 1,
    }


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def canonical(body: dict) -> bytes:
    """The manifest's bytes: UTF-8 JSON. File names that are not valid UTF-8 (held as lone surrogates, as
    ``os.fsdecode`` gives them) are written as ``\\udcXX`` escapes, which JSON reads back to the same name;
    bodies without such names are byte-identical to the format's first version."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode("utf-8")


def save(folder: Path, body: dict) -> None:
    payload = canonical(body)
    digest = hashlib.sha256(payload).hexdigest()
    write_bytes_atomic(folder / MANIFEST_NAME, b'{"sha256":"' + digest.encode() + b'","body":' + payload + b"}\n")


def exists(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file()


def load(folder: Path) -> dict:
    """Read and check the manifest; raise :class:`CorruptDatabaseError` naming it when anything is off."""
    path = folder / MANIFEST_NAME
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CorruptDatabaseError(folder, path, "missing") from None
    except OSError as exc:
        raise CorruptDatabaseError(folder, path, f"unreadable: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptDatabaseError(folder, path, f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict) or "sha256" not in doc:
        raise CorruptDatabaseError(folder, path, "not a shield_db manifest (no body/sha256)")
    body = doc["body"]
    if hashlib.sha256(canonical(body)).hexdigest() != doc["sha256"]:
        raise CorruptDatabaseError(folder, path, "checksum mismatch: the file was edited or damaged")
    missing = [k for k in REQUIRED_KEYS if k not in body]
    if missing or body["format"] != FORMAT:
        raise CorruptDatabaseError(folder, path, f"missing keys {missing} or wrong format {body.get('format')!r}")
    if body["format_version"] != FORMAT_VERSION:
        raise CorruptDatabaseError(folder, path, f"format version {body['format_version']} is not the supported "
                                                 f"version {FORMAT_VERSION}")
    return body


def row_count(body: dict) -> int:
    return sum(int(s["rows"]) for s in body["shards"])


def live_rows(body: dict) -> list[int]:
    """Sorted distinct rows referenced by at least one item."""
    return sorted({int(item[ROW]) for item in body["items"]})
