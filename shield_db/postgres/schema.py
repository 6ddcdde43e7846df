"""Tables of one shield set in a PostgreSQL schema, partitioned by cell across servers.

Coordinator (the server the DSN names)::

    <s>.meta(key, value jsonb)                       item shape, VAE fingerprint, target, skipped files, fit state
    <s>.basis(id, mu bytea, a bytea)                 projection of shield_db.projection (float64 bytes)
    <s>.cells(cell, part, centre float8[], radius)   k-means cells of the features, radius >= every member's distance
    <s>.blobs(row, sha256 unique, cell, part)        one row per stored latent (content hash -> row)
    <s>.items(source, sha256, row, size, mtime_ns)   one row per file; items with the same content share a row
    <s>.shields(part, cell, row, feature, latent, thumbnail)  PARTITION BY LIST (part)

``feature`` is ``cube`` (contrib, float64, exact ``cube_distance``) or pgvector's ``vector(65)`` (float32). Partition
``p`` holds the cells with ``cell % parts == p``; it is a local table, or a postgres_fdw foreign table whose rows live
on another server (:func:`attach_remote_part`). Beside each partition, on its server, ``shields_p<p>_stamp`` holds the
commit counter of the last commit that wrote there: a reader checks that every shard's stamp equals the coordinator's
counter, i.e. that the shards' snapshots match the coordinator's.
"""
from __future__ import annotations

import re

from psycopg import sql

NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,50}$")
FEATURE_SQL = {"cube": "cube", "vector": "vector({dim})"}
FEATURE_EXTENSION = {"cube": "cube", "vector": "vector"}


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ValueError(f"shield set name {name!r} must be lower-case letters, digits and '_' (a PostgreSQL schema "
                         "name), starting with a letter or '_'")
    return name


def schema_of(name: str) -> str:
    return "shield_" + check_name(name)


def available_feature_type(conn) -> str:
    """``cube`` when the server offers it (exact float64 distances), else ``vector`` (pgvector)."""
    names = {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions WHERE name IN ('cube', 'vector')")}
    for kind in ("cube", "vector"):
        if kind in names:
            return kind
    raise ValueError("this PostgreSQL server has neither the contrib extension 'cube' nor pgvector ('vector'): "
                     "install one (Debian: postgresql-contrib, included in `postgresql`; pgvector: "
                     "postgresql-<version>-pgvector) or use a managed Postgres that offers pgvector")


def shields_columns(feature_type: str, dim: int) -> sql.Composable:
    kind = sql.SQL(FEATURE_SQL[feature_type].format(dim=int(dim)))
    return sql.SQL("part int NOT NULL, cell int NOT NULL, row bigint NOT NULL, feature {} NOT NULL, "
                   "latent bytea NOT NULL, thumbnail bytea").format(kind)


def create_coordinator(conn, name: str, feature_type: str, dim: int, parts: int) -> None:
    s = sql.Identifier(schema_of(name))
    conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(FEATURE_EXTENSION[feature_type])))
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(s))
    for ddl in ("CREATE TABLE {s}.meta (key text PRIMARY KEY, value jsonb NOT NULL)",
                "CREATE TABLE {s}.basis (id int PRIMARY KEY, mu bytea NOT NULL, a bytea NOT NULL, rows int NOT NULL, "
                "cols int NOT NULL)",
                "CREATE TABLE {s}.cells (cell int PRIMARY KEY, part int NOT NULL, centre float8[] NOT NULL, "
                "radius float8 NOT NULL)",
                "CREATE TABLE {s}.blobs (row bigint PRIMARY KEY, sha256 text NOT NULL UNIQUE, cell int NOT NULL, "
                "part int NOT NULL)",
                "CREATE TABLE {s}.items (source text PRIMARY KEY, sha256 text NOT NULL, row bigint NOT NULL, "
                "size bigint NOT NULL, mtime_ns bigint NOT NULL)",
                "CREATE INDEX ON {s}.items (row)"):
        conn.execute(sql.SQL(ddl).format(s=s))
    conn.execute(sql.SQL("CREATE TABLE {s}.shields ({cols}) PARTITION BY LIST (part)").format(
        s=s, cols=shields_columns(feature_type, dim)))
    del parts  # partitions are attached one by one (local or remote)


def part_table(name: str, part: int) -> str:
    return f"shields_p{int(part)}"


def create_part_table(conn, schema: str, table: str, feature_type: str, dim: int) -> None:
    """A plain table with the partition's columns, an index on cell, latents stored uncompressed out of line."""
    s, t = sql.Identifier(schema), sql.Identifier(table)
    conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(FEATURE_EXTENSION[feature_type])))
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
    conn.execute(sql.SQL("CREATE TABLE {}.{} ({})").format(s, t, shields_columns(feature_type, dim)))
    conn.execute(sql.SQL("ALTER TABLE {}.{} ALTER COLUMN latent SET STORAGE EXTERNAL").format(s, t))
    conn.execute(sql.SQL("CREATE INDEX ON {}.{} (cell)").format(s, t))
    conn.execute(sql.SQL("CREATE INDEX ON {}.{} (row)").format(s, t))
    conn.execute(sql.SQL("CREATE TABLE {}.{} (generation bigint NOT NULL)").format(s, sql.Identifier(table + "_stamp")))
    conn.execute(sql.SQL("INSERT INTO {}.{} VALUES (0)").format(s, sql.Identifier(table + "_stamp")))


def attach_local_part(conn, name: str, part: int, feature_type: str, dim: int) -> None:
    schema, table = schema_of(name), part_table(name, part)
    create_part_table(conn, schema, table, feature_type, dim)
    conn.execute(sql.SQL("ALTER TABLE {s}.shields ATTACH PARTITION {s}.{t} FOR VALUES IN ({p})").format(
        s=sql.Identifier(schema), t=sql.Identifier(table), p=sql.Literal(int(part))))


def options_clause(options: dict) -> sql.Composable:
    if not options:
        return sql.SQL("")
    return sql.SQL("OPTIONS ({})").format(sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(str(v))) for k, v in options.items()))


def attach_remote_part(conn, name: str, part: int, feature_type: str, dim: int, server: str, options: dict,
                       user_options: dict) -> None:
    """Partition ``part`` as a postgres_fdw foreign table on ``server`` (its table must exist there already).

    ``extensions`` lets the cube/pgvector distance be evaluated on the shard; ``async_capable`` lets one query
    scan every shard at once (PostgreSQL 14+ asynchronous append).
    """
    schema, table = schema_of(name), part_table(name, part)
    conn.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
    opts = {**options, "extensions": FEATURE_EXTENSION[feature_type], "async_capable": "true",
            "fetch_size": "1000"}
    conn.execute(sql.SQL("CREATE SERVER IF NOT EXISTS {} FOREIGN DATA WRAPPER postgres_fdw {}").format(
        sql.Identifier(server), options_clause(opts)))
    conn.execute(sql.SQL("CREATE USER MAPPING IF NOT EXISTS FOR CURRENT_USER SERVER {} {}").format(
        sql.Identifier(server), options_clause(user_options)))
    conn.execute(sql.SQL("CREATE FOREIGN TABLE {s}.{t} PARTITION OF {s}.shields FOR VALUES IN ({p}) SERVER {srv} "
                         "OPTIONS (schema_name {rs}, table_name {rt})").format(
        s=sql.Identifier(schema), t=sql.Identifier(table), p=sql.Literal(int(part)), srv=sql.Identifier(server),
        rs=sql.Literal(schema), rt=sql.Literal(table)))
    conn.execute(sql.SQL("CREATE FOREIGN TABLE {s}.{t} (generation bigint NOT NULL) SERVER {srv} "
                         "OPTIONS (schema_name {rs}, table_name {rt})").format(
        s=sql.Identifier(schema), t=sql.Identifier(table + "_stamp"), srv=sql.Identifier(server),
        rs=sql.Literal(schema), rt=sql.Literal(table + "_stamp")))
