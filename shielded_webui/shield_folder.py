"""The "Shield folder" control: a folder of protected images -> a shield source through ``shield_db``.

Same rules as ComfyUI's Shield Set Loader: a name is resolved under the WebUI's ``models/shields/``; an absolute
path only inside a root listed in ``<WebUI data dir>/shielded_sampling/allowed_roots.txt`` or in
``$SHIELD_SET_ALLOWED_ROOTS``. Images are encoded with the checkpoint's VAE at the size of the pass being
sampled and cached in ``<folder>/.shield_db/`` (per VAE, size and resize mode), so unchanged images are never
encoded twice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from shield_db.database import ShieldDatabase
from shield_db.folder import sync_folder
from shield_db.paths import ALLOWED_ROOTS_ENV, ALLOWED_ROOTS_FILE, read_allow_list, resolve_folder
from shield_db.source import DatabaseShields
from shield_db.vae import vae_encoder, vae_fingerprint

from .settings import SCRIPT, SettingsError

LOG = logging.getLogger("shielded_sampling")
RESIZE = "center-crop"
THUMBNAIL_SIZE = 48


@dataclass
class Roots:
    shields: list[Path]        # names are resolved under these
    allow_list_file: Path      # absolute paths must lie inside a root listed here (or in the env variable)

    def resolve(self, folder: str) -> Path:
        hint = f"{self.allow_list_file} or ${ALLOWED_ROOTS_ENV}"
        try:
            return resolve_folder(folder, self.shields, read_allow_list(self.allow_list_file), hint)
        except ValueError as err:
            raise SettingsError(str(err).replace("Shield Set Loader: input 'folder'", f"{SCRIPT}: 'Shield folder'")
                                .replace("input/ or models/shields/", "models/shields/")) from err


def webui_roots() -> Roots:
    """``models/shields/`` of this WebUI and its allow-list file (read from the WebUI's own path settings)."""
    from modules import paths_internal   # the WebUI's module; imported here so the rest stays host-free
    models = Path(paths_internal.models_path)
    (models / "shields").mkdir(parents=True, exist_ok=True)
    return Roots([models / "shields"], Path(paths_internal.data_path) / "shielded_sampling" / ALLOWED_ROOTS_FILE)


def latent_shape(vae, width: int, height: int) -> tuple:
    """``(C, height / f, width / f)`` for a Forge/reForge VAE (``downscale_ratio`` f, ``latent_channels`` C)."""
    ratio = int(getattr(vae, "downscale_ratio", 8))
    if width % ratio or height % ratio:
        raise SettingsError(f"{SCRIPT}: width {width} and height {height} must be multiples of the VAE's factor {ratio}")
    return (int(vae.latent_channels), height // ratio, width // ratio)


def load(path: Path, vae, width: int, height: int, batch_size: int = 8):
    """``(DatabaseShields in VAE-latent space, name, sync summary)`` for ``path`` encoded at ``width x height``."""
    shape = latent_shape(vae, width, height)
    result = sync_folder(path, vae_encoder(vae), shape, width, height, RESIZE, vae_fingerprint(vae),
                         batch_size=batch_size, thumbnail_size=THUMBNAIL_SIZE)
    source = DatabaseShields(ShieldDatabase(result.database).snapshot())
    if len(source) == 0:
        raise SettingsError(f"{SCRIPT}: 'Shield folder' {path} holds no usable image ({result.summary()}); add "
                            f"images (png/jpg/webp) or clear the field")
    LOG.info("%s: shield folder %s: %s", SCRIPT, path, result.summary())
    return source, f"{path.name} ({len(source)} images)", result.summary()
