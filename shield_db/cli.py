"""Command line: ``python -m shield_db build|inspect|verify|reindex``.

``build`` needs ComfyUI importable (run it with ComfyUI's Python and ``PYTHONPATH=<ComfyUI folder>``, from the
pack's folder); ``inspect``, ``verify`` and ``reindex`` need only this package.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import manifest
from .database import ShieldDatabase
from .snapshot import Snapshot
from .transaction import INDEX_DIM_KEY, check_index_dim, maintenance_owed
from .errors import DatabaseLockedError, ShieldDatabaseError
from .folder import CACHE_DIR, database_folder, sync_folder
from .images import RESIZE_MODES
from .lock import database_lock
from .storage import sha256_file

LOG = logging.getLogger("shielded_sampling.shield_db")


def databases(path: Path) -> list[Path]:
    """``path`` itself if it is a database, else every cache database of the image folder ``path``."""
    if manifest.exists(path):
        return [path]
    found = sorted(p.parent for p in (path / CACHE_DIR).glob("*/" + manifest.MANIFEST_NAME))
    if not found:
        raise ShieldDatabaseError(f"{path} is neither a shield database nor a folder with {CACHE_DIR}/ databases")
    return found


def progress_bar(stream=sys.stderr):
    start = time.monotonic()

    def show(done: int, total: int):
        width = 30
        filled = width * done // max(1, total)
        rate = done / max(1e-9, time.monotonic() - start)
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images, {rate:.1f}/s")
        if done >= total:
            stream.write("\n")
        stream.flush()
    return show


def cmd_build(args) -> int:
    try:
        import torch
        import comfy.cli_args
        if args.cpu or not (torch.cuda.is_available() or getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            comfy.cli_args.args.cpu = True  # must be set before comfy.model_management is imported
        import comfy.sd
        import comfy.utils
    except ImportError:
        LOG.error("build needs ComfyUI: run with ComfyUI's Python and PYTHONPATH=<ComfyUI folder>")
        return 2
    from .vae import latent_shape, vae_encoder, vae_fingerprint
    sd, metadata = comfy.utils.load_torch_file(str(args.vae), safe_load=True, return_metadata=True)
    vae = comfy.sd.VAE(sd=sd, metadata=metadata)
    vae.throw_exception_if_invalid()
    fp = vae_fingerprint(vae)
    folder = Path(args.folder).resolve()
    if args.backend == "postgres":  # imported only when chosen: psycopg is optional
        from .postgres.cli import build as build_postgres
        return build_postgres(args, folder, vae_encoder(vae), latent_shape(vae, args.width, args.height,
                                                                          "shield_db build"), fp, progress_bar())
    target = args.db or database_folder(folder, fp, args.width, args.height, args.resize)
    result = sync_folder(folder, vae_encoder(vae), latent_shape(vae, args.width, args.height, "shield_db build"),
                         args.width, args.height, args.resize, fp, batch_size=args.batch_size,
                         thumbnail_size=args.thumbnail_size, rebuild=args.rebuild, database=target,
                         progress=progress_bar(), commit_rows=args.commit_rows)
    if ShieldDatabase(result.database).finish_pending():  # a killed build had left its finish undone
        LOG.info("%s: finished the maintenance an interrupted build left (merge, index, cleanup)", result.database)
    LOG.info("%s: %s", result.database, result.summary())
    return 0


def describe(path: Path, lock_timeout: float = 600.0) -> dict:
    """Counts and sizes, read under the shared lock; changes nothing (works on read-only media)."""
    with database_lock(path, exclusive=False, timeout=lock_timeout):
        snap = Snapshot(path, manifest.load(path), check_sha=False)
    body = snap.body
    return {
        "database": str(path), "shields": len(snap.live_rows), "items": len(body["items"]), "rows": snap.rows,
        "dead_rows": snap.rows - len(snap.live_rows), "item_shape": body["item_shape"],
        "latent_channels": body["latent_channels"], "dtype": body["dtype"], "target": body["target"],
        "vae_fingerprint": body["vae_fingerprint"], "shards": len(body["shards"]),
        "index": None if body["index"] is None else {"rows": body["index"]["rows"], "dim": body["index"]["dim"] + 1,
                                                     "directions": body["index"]["dim"]},
        "index_dim_chosen": body.get(INDEX_DIM_KEY),  # None: new writes use the default
        "skipped": len(body["skipped"]), "thumbnail_size": body["thumbnail_size"],
        "maintenance_owed": maintenance_owed(path, body),
        "bytes_on_disk": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
    }


def cmd_inspect(args) -> int:
    for path in databases(Path(args.path)):
        LOG.info("%s", json.dumps(describe(path, args.lock_timeout), indent=1))
    return 0


def cmd_verify(args) -> int:
    """Recompute every checksum (manifest, shards, index) and open the database; exit 1 on any problem.

    Runs under the shared lock, so a writer's commit or cleanup is never seen half done (it waits for the
    writer, up to ``--lock-timeout``). Changes nothing: works on read-only media.
    """
    status = 0
    for path in databases(Path(args.path)):
        try:
            with database_lock(path, exclusive=False, timeout=args.lock_timeout):
                checked = verify_database(path)
            LOG.info("OK %s: %d files verified", path, checked)
        except DatabaseLockedError as err:
            LOG.error("NOT CHECKED %s (nothing was found wrong; run verify again when the build is done)", err)
            status = 1
        except ShieldDatabaseError as err:
            LOG.error("FAILED %s", err)
            status = 1
    return status


def cmd_reindex(args) -> int:
    """Refit each database's search index with ``--index-dim`` PCA directions and keep that choice for later writes
    (the Shield Set Loader's syncs included). Exact either way; the directions only change the speed and memory."""
    try:
        check_index_dim(args.index_dim)
    except ValueError as err:
        LOG.error("error: --index-dim: %s", err)
        return 2
    status = 0
    for path in databases(Path(args.path)):
        try:
            start = time.perf_counter()
            with ShieldDatabase(path, lock_timeout=args.lock_timeout).writer(index_dim=args.index_dim):
                pass
            entry = manifest.load(path)["index"]
            dim = "no index (fewer than 2 shields)" if entry is None else f"{entry['dim']} directions"
            LOG.info("%s: indexed with %s in %.1f s; later writes keep %d", path, dim, time.perf_counter() - start,
                     args.index_dim)
        except DatabaseLockedError as err:
            LOG.error("NOT RE-INDEXED %s (run reindex again when the build is done)", err)
            status = 1
    return status


def verify_database(path: Path) -> int:
    """Hash every file against the manifest (ignoring remembered verdicts) and open it; returns the file count."""
    body = manifest.load(path)
    files = [(e["file"], e["sha256"]) for e in body["shards"]]
    if body["index"]:
        files += [(body["index"][k]["file"], body["index"][k]["sha256"]) for k in ("basis", "faiss")]
    bad = []
    for name, sha in files:
        try:
            if sha256_file(path / name) != sha:
                bad.append(name)
        except OSError as exc:
            bad.append(f"{name} ({exc.strerror})")
    if bad:
        raise ShieldDatabaseError(f"shield database {path}: checksum mismatch or missing: {bad}. Rebuild it with "
                                  f"`python -m shield_db build --rebuild ...`")
    Snapshot(path, body)
    return len(files)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shield_db", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="encode a folder of images into a database (resumes an interrupted build)")
    b.add_argument("folder", help="folder of protected images")
    b.add_argument("--vae", required=True, type=Path, help="VAE file (.safetensors) as in ComfyUI's models/vae/")
    b.add_argument("--width", type=int, default=512)
    b.add_argument("--height", type=int, default=512)
    b.add_argument("--resize", choices=RESIZE_MODES, default="center-crop")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--thumbnail-size", type=int, default=48)
    b.add_argument("--db", type=Path, default=None, help="database folder (default: <folder>/.shield_db/<key>, "
                                                         "where the Shield Set Loader looks)")
    b.add_argument("--commit-rows", type=int, default=256, help="images per commit: a stopped build resumes from "
                                                                "the last commit (default 256)")
    b.add_argument("--rebuild", action="store_true", help="discard the existing database and encode everything")
    b.add_argument("--cpu", action="store_true", help="encode on the CPU (automatic when no GPU is available)")
    from .postgres.cli import add_arguments as add_postgres_arguments
    add_postgres_arguments(b)
    b.set_defaults(run=cmd_build)
    for name, run, text in (("inspect", cmd_inspect, "counts, shapes and size on disk"),
                            ("verify", cmd_verify, "recompute every checksum")):
        c = sub.add_parser(name, help=text)
        c.add_argument("path", help="a database folder, or an image folder with .shield_db/ databases")
        c.add_argument("--lock-timeout", type=float, default=600.0,
                       help="seconds to wait for a running build to release the database (default 600)")
        c.set_defaults(run=run)
    r = sub.add_parser("reindex", help="refit the search index with another number of PCA directions (kept by later "
                                       "writes)")
    r.add_argument("path", help="a database folder, or an image folder with .shield_db/ databases")
    r.add_argument("--index-dim", type=int, required=True,
                   help="PCA directions of the search index (default of new databases: 128; 256 passes ~3x fewer "
                        "candidates on real images and is ~13%% faster at 1M shields on a CPU, for twice the index's "
                        "RAM and VRAM)")
    r.add_argument("--lock-timeout", type=float, default=600.0,
                   help="seconds to wait for a running build to release the database (default 600)")
    r.set_defaults(run=cmd_reindex)
    return p


def configure_logging():
    """Results to stdout, problems to stderr, as plain lines (this is a terminal tool)."""
    if LOG.handlers:
        return
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


def main(argv=None) -> int:
    configure_logging()
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ShieldDatabaseError as err:
        LOG.error("error: %s", err)
        return 1
    except OSError as err:  # disk full, read-only, I/O error: everything committed before it is kept
        LOG.error("error: %s. Everything committed before this error is kept; fix the cause and run the same "
                  "command again to resume.", err)
        return 1
