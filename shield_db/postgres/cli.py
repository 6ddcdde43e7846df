"""``python -m shield_db build --backend postgres``: the command-line options and the build into PostgreSQL."""
from __future__ import annotations

import logging

LOG = logging.getLogger("shielded_sampling.shield_db")


def add_arguments(parser) -> None:
    parser.add_argument("--backend", choices=("files", "postgres"), default="files",
                        help="files: a database folder (default); postgres: a PostgreSQL shield set (needs psycopg)")
    parser.add_argument("--dsn", default="embedded",
                        help="postgres: libpq connection string of the coordinator server, or 'embedded' (default) "
                             "for the pack's private server in $SHIELD_PG_DATA")
    parser.add_argument("--name", default=None,
                        help="postgres: shield set name (default: derived from the folder, VAE and size)")
    parser.add_argument("--shard", action="append", default=None, metavar="DSN",
                        help="postgres, new sets only: put a partition on this server (repeat; 'local' keeps one "
                             "on the coordinator). Default: one local partition")


def build(args, folder, encode, item_shape, vae_fingerprint, progress) -> int:
    """Sync ``folder`` into the PostgreSQL set; logs the summary and how to load it."""
    from .server import resolve_dsn
    from .sync import sync_folder_postgres
    shards = [None if s in ("local", "") else s for s in (args.shard or ["local"])]
    result, store = sync_folder_postgres(folder, encode, item_shape, args.width, args.height, args.resize,
                                         vae_fingerprint, resolve_dsn(args.dsn), name=args.name,
                                         batch_size=args.batch_size, thumbnail_size=args.thumbnail_size,
                                         rebuild=args.rebuild, progress=progress, commit_rows=args.commit_rows,
                                         shards=shards)
    LOG.info("%s: %s", store, result.summary())
    return 0
