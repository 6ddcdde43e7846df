"""Shield Set Loader: a folder of protected images -> SHIELD_SET searched exactly through a shield_db database.

Folders are named relative to ComfyUI's ``input/`` or a ``shields`` model folder (``models/shields/`` and any
``shields:`` entry of ``extra_model_paths.yaml``). Absolute paths are refused unless they lie inside a folder
listed in ``<ComfyUI>/user/shielded_sampling/allowed_roots.txt`` (one absolute path per line) or in the
``SHIELD_SET_ALLOWED_ROOTS`` environment variable (os.pathsep separated). Inside the folder only regular files
are read, and links only when they resolve inside those roots; everything else is skipped and reported. The encoded
latents are cached in ``<folder>/.shield_db/`` per VAE, size and resize mode; a cache path with a link in it is
refused (docs/shield_sets.md).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths

from ..shield_db.images import RESIZE_MODES
from ..shield_db.resident import resident_budget
from ..shield_db.paths import (ALLOWED_ROOTS_ENV, ALLOWED_ROOTS_FILE, UnsafeCacheError, read_allow_list,
                               resolve_folder)
from .shield_set import SHIELD_SET, ShieldSet

try:  # the on-disk store needs faiss-cpu: without it the node stays listed and says what to install
    from ..shield_db.database import ShieldDatabase
    from ..shield_db.folder import display_name, fingerprint, sync_folder
    from ..shield_db.source import DatabaseShields
    from ..shield_db.vae import latent_shape, vae_encoder, vae_fingerprint
    STORAGE_IMPORT_ERROR = None
except ImportError as _err:
    STORAGE_IMPORT_ERROR = _err

LOG = logging.getLogger("shielded_sampling")
CATEGORY = "sampling/shielded"
NODE = "Shield Set Loader"
SHIELDS_FOLDER = "shields"
THUMBNAIL_SIZE = 48

folder_paths.add_model_folder_path(SHIELDS_FOLDER, os.path.join(folder_paths.models_dir, SHIELDS_FOLDER))


def allow_list_file() -> Path:
    return Path(folder_paths.get_user_directory()) / "shielded_sampling" / ALLOWED_ROOTS_FILE


def roots() -> list[Path]:
    return [Path(folder_paths.get_input_directory())] + [Path(p) for p in folder_paths.get_folder_paths(SHIELDS_FOLDER)]


def require_storage():
    """Raise the missing-dependency error of the on-disk store, naming the package and the fix."""
    if STORAGE_IMPORT_ERROR is not None:
        missing = getattr(STORAGE_IMPORT_ERROR, "name", None) or str(STORAGE_IMPORT_ERROR)
        package = "faiss-cpu" if missing == "faiss" else missing
        raise RuntimeError(f"{NODE}: shield sets on disk need the Python package '{package}', which failed to "
                           f"import ({STORAGE_IMPORT_ERROR}). Install it into ComfyUI's Python "
                           f"(python -m pip install {package}) and restart ComfyUI; the other shielded-sampling "
                           "nodes work without it.")


def allowed_roots() -> list[Path]:
    """Every folder files may be read from: input/, the shields folders and the allow-list."""
    return roots() + read_allow_list(allow_list_file())


def resolve(folder: str) -> Path:
    hint = f"{allow_list_file()} or ${ALLOWED_ROOTS_ENV}"
    return resolve_folder(folder, roots(), read_allow_list(allow_list_file()), hint)


_LOADED: dict[tuple, dict] = {}  # (folder, width, height, resize) -> {database folder: committed state when loaded}


def database_changes(path: Path, width, height, resize) -> str:
    """Empty while the databases loaded for these inputs are as they were committed when loaded; else their
    new states: a shard damaged or replaced while ComfyUI holds the set makes the node run again (and check it)."""
    loaded = _LOADED.get((str(path), width, height, resize), {})
    now = {db: ShieldDatabase(db).committed_state() for db in sorted(loaded)}
    return "" if now == loaded else ":database changed:" + "".join(now.values())


class ShieldSetLoader:
    DESCRIPTION = ("Encodes a folder of protected images with a VAE into a shield set that SPELL keeps every "
                   "output away from. Cached on disk: unchanged images are never re-encoded.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (SHIELD_SET, "STRING")
    RETURN_NAMES = ("shield_set", "report")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "shields", "tooltip":
                       "Folder of protected images, relative to ComfyUI's input/ or models/shields/ (sub-folders "
                       "included). Absolute paths only inside a root listed in user/shielded_sampling/"
                       "allowed_roots.txt or $SHIELD_SET_ALLOWED_ROOTS."}),
            "vae": ("VAE", {"tooltip": "The VAE of the model you sample with: shields live in its latent space."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                              "tooltip": "Width the images are resized to before encoding; use your generation width."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                               "tooltip": "Height the images are resized to before encoding; use your generation height."}),
            "resize": (list(RESIZE_MODES), {"default": "center-crop", "tooltip":
                       "center-crop: cover the target then crop the middle; pad: fit inside with black bars; "
                       "stretch: ignore the aspect ratio."}),
            "batch_size": ("INT", {"default": 8, "min": 1, "max": 256,
                                   "tooltip": "Images encoded per VAE call (lower it if the VAE runs out of memory)."}),
            "rebuild": ("BOOLEAN", {"default": False, "tooltip":
                        "Discard this folder's cache and encode everything again (use it when the cache is "
                        "reported corrupt)."}),
        }, "optional": {
            "backend": (["files", "postgres"], {"default": "files", "tooltip":
                        "files: cache in <folder>/.shield_db/ (default). postgres: a PostgreSQL shield set for very "
                        "large sets, optionally partitioned over servers (needs the psycopg package; "
                        "docs/shield_db_postgres.md)."}),
            "dsn": ("STRING", {"default": "embedded", "tooltip":
                    "postgres only: 'embedded' runs the pack's private server in user/shielded_sampling/postgres; "
                    "or a libpq connection string / service (host=... dbname=... or service=...). Never put a "
                    "password here (workflows are saved into images): use ~/.pgpass or a service file."}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, width, height, resize, batch_size, rebuild, backend="files", dsn="embedded", **_):
        if rebuild or STORAGE_IMPORT_ERROR is not None or backend == "postgres":
            return float("nan")  # postgres: every run takes a fresh snapshot (unchanged: a folder scan + one query)
        try:
            path = resolve(folder)
            return fingerprint(path, width, height, resize) + database_changes(path, width, height, resize)
        except ValueError as err:
            return str(err)

    def load(self, folder, vae, width, height, resize, batch_size, rebuild=False, backend="files", dsn="embedded"):
        require_storage()
        path = resolve(folder)
        fp = vae_fingerprint(vae)
        shape = latent_shape(vae, width, height)
        bar = comfy.utils.ProgressBar(1)
        if backend == "postgres":
            from .shield_loader_postgres import load_postgres  # psycopg only when chosen
            return load_postgres(path, vae_encoder(vae), shape, width, height, resize, fp, batch_size, rebuild, dsn,
                                 bar, allowed_roots())
        try:
            budget = resident_budget()
        except ValueError as err:  # a bad SHIELDED_SAMPLING_RESIDENT_MB: stop before encoding anything
            raise ValueError(f"{NODE}: {err}") from None
        try:
            result = sync_folder(path, vae_encoder(vae), shape, width, height, resize, fp, batch_size=batch_size,
                                 thumbnail_size=THUMBNAIL_SIZE, rebuild=rebuild,
                                 progress=lambda done, total: bar.update_absolute(done, total),
                                 allowed_roots=allowed_roots(),
                                 interrupted=comfy.model_management.throw_exception_if_processing_interrupted)
        except UnsafeCacheError as err:
            raise ValueError(f"{NODE}: input 'folder' {folder!r}: {err}") from None
        snapshot = ShieldDatabase(result.database).snapshot()
        _LOADED.setdefault((str(path), width, height, resize), {})[result.database] = \
            ShieldDatabase(result.database).committed_state()
        source = DatabaseShields(snapshot, resident_bytes=budget)
        name = f"{path.name} ({len(source)} images)"
        LOG.info("%s: %s: %s", NODE, path, result.summary())
        labels = [display_name(s) for s in snapshot.live_sources]
        shield_set = ShieldSet(source, name=name, thumbnails=source.thumbnails, labels=labels)
        return (shield_set, f"{display_name(str(path))}: {result.summary()}")


NODE_CLASS_MAPPINGS = {"ShieldSetLoader": ShieldSetLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"ShieldSetLoader": NODE}
