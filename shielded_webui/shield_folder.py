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

import torch

from shield_db.database import ShieldDatabase
from shield_db.folder import sync_folder
from shield_db.paths import ALLOWED_ROOTS_ENV, ALLOWED_ROOTS_FILE, FolderInput, read_allow_list, resolve_folder
from shield_db.resident import resident_budget
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
        names = FolderInput(field=f"{SCRIPT}: 'Shield folder'", places="models/shields/")
        try:
            return resolve_folder(folder, self.shields, read_allow_list(self.allow_list_file), hint, names)
        except ValueError as err:
            raise SettingsError(str(err)) from err


def webui_roots() -> Roots:
    """``models/shields/`` of this WebUI and its allow-list file (read from the WebUI's own path settings)."""
    from modules import paths_internal   # the WebUI's module; imported here so the rest stays host-free
    models = Path(paths_internal.models_path)
    (models / "shields").mkdir(parents=True, exist_ok=True)
    return Roots([models / "shields"], Path(paths_internal.data_path) / "shielded_sampling" / ALLOWED_ROOTS_FILE)


class A1111Vae:
    """``shield_db``'s VAE interface over an Automatic1111 checkpoint's first stage (ldm ``AutoencoderKL``):
    ``encode(images [B, H, W, 3] in 0..1)`` -> the posterior's mode, an unscaled VAE latent (what Forge's
    ``VAE.encode`` returns), so caches and shields mean the same on both kinds of WebUI."""

    downscale_ratio = 8

    def __init__(self, sd_model):
        self.first_stage_model = sd_model.first_stage_model
        self.latent_channels = int(getattr(sd_model, "latent_channels", 4))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        weight = next(self.first_stage_model.parameters())
        pixels = images.movedim(-1, 1).to(weight.device, weight.dtype) * 2.0 - 1.0
        posterior = self.first_stage_model.encode(pixels)
        if not hasattr(posterior, "mode"):
            raise SettingsError(f"{SCRIPT}: this checkpoint's VAE does not return a posterior distribution "
                                f"(not an SD1.x/SD2.x first stage); shield folders are not supported for it")
        return posterior.mode().float()


def vae_of(sd_model, hook: str):
    """The checkpoint's VAE for ``shield_db``: Forge's own ``VAE`` object, or a new ``A1111Vae`` per generation
    (A1111 swaps a VAE by loading weights into the same module, so its weight fingerprint is never reused)."""
    forge = getattr(getattr(sd_model, "forge_objects", None), "vae", None)
    if forge is not None and not hook.startswith("A1111"):
        return forge
    if getattr(sd_model, "first_stage_model", None) is None:
        raise SettingsError(f"{SCRIPT}: this checkpoint has no VAE (first_stage_model) to encode the shield folder")
    return A1111Vae(sd_model)


def check_shape(source, item_shape: tuple):
    """Refuse a shield set whose latents do not have this pass's shape."""
    if source is not None and tuple(source.item_shape) != tuple(item_shape):
        got, want = "x".join(map(str, source.item_shape)), "x".join(map(str, item_shape))
        raise SettingsError(f"{SCRIPT}: the shield set holds latents of shape {got} but this pass samples {want} "
                            f"(channels x height/8 x width/8); use shields made with this model family at this size")


def latent_shape(vae, width: int, height: int) -> tuple:
    """``(C, height / f, width / f)`` for a Forge/reForge VAE (``downscale_ratio`` f, ``latent_channels`` C)."""
    ratio = int(getattr(vae, "downscale_ratio", 8))
    if width % ratio or height % ratio:
        raise SettingsError(f"{SCRIPT}: width {width} and height {height} must be multiples of the VAE's factor {ratio}")
    return (int(vae.latent_channels), height // ratio, width // ratio)


def load(path: Path, vae, width: int, height: int, batch_size: int = 8):
    """``(DatabaseShields in VAE-latent space, name, sync summary)`` for ``path`` encoded at ``width x height``."""
    shape = latent_shape(vae, width, height)
    try:
        budget = resident_budget()
    except ValueError as err:  # a bad SHIELDED_SAMPLING_RESIDENT_MB: stop before encoding anything
        raise SettingsError(f"{SCRIPT}: {err}") from None
    result = sync_folder(path, vae_encoder(vae), shape, width, height, RESIZE, vae_fingerprint(vae),
                         batch_size=batch_size, thumbnail_size=THUMBNAIL_SIZE)
    source = DatabaseShields(ShieldDatabase(result.database).snapshot(), resident_bytes=budget)
    if len(source) == 0:
        raise SettingsError(f"{SCRIPT}: 'Shield folder' {path} holds no usable image ({result.summary()}); add "
                            f"images (png/jpg/webp) or clear the field")
    LOG.info("%s: shield folder %s: %s", SCRIPT, path, result.summary())
    return source, f"{path.name} ({len(source)} images)", result.summary()
