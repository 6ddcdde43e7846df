"""Shield Set Loader, backend 'postgres': the folder synced into a PostgreSQL shield set, searched exactly there."""
from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management
import folder_paths

from ..shield_db.errors import ShieldDatabaseError
from ..shield_db.folder import display_name
from .shield_set import ShieldSet

LOG = logging.getLogger("shielded_sampling")
NODE = "Shield Set Loader"


def check_dsn(dsn: str) -> str:
    """Refuse passwords in the node's input: workflows (and so the DSN) are saved into every output image."""
    if "password" in (dsn or "").lower():
        raise ValueError(f"{NODE}: input 'dsn' contains a password; workflows are saved into images, so keep it in "
                         "~/.pgpass, $PGPASSFILE or a pg_service.conf service (dsn 'service=name') instead")
    return (dsn or "embedded").strip()


def load_postgres(path: Path, encode, shape, width, height, resize, fp, batch_size, rebuild, dsn, bar, roots):
    dsn = check_dsn(dsn)
    try:
        from ..shield_db.postgres.server import resolve_dsn
        from ..shield_db.postgres.sync import sync_folder_postgres
        data_dir = Path(folder_paths.get_user_directory()) / "shielded_sampling" / "postgres"
        result, store = sync_folder_postgres(path, encode, shape, width, height, resize, fp,
                                             resolve_dsn(dsn, data_dir), batch_size=batch_size, rebuild=rebuild,
                                             progress=lambda done, total: bar.update_absolute(done, total),
                                             allowed_roots=roots,
                                             interrupted=comfy.model_management.throw_exception_if_processing_interrupted)
        source = store.source()
    except ShieldDatabaseError as err:
        raise RuntimeError(f"{NODE} (backend postgres): {err}") from None
    LOG.info("%s: %s -> %s: %s", NODE, path, store, result.summary())
    labels = [display_name(s) for s in source.live_sources]
    shield_set = ShieldSet(source, name=f"{path.name} ({len(source)} images, PostgreSQL)",
                           thumbnails=source.thumbnails, labels=labels)
    return (shield_set, f"{display_name(str(path))} (PostgreSQL {store.name}): {result.summary()}")
