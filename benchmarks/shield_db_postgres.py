"""PostgreSQL shield source vs the file database, same data, one process: ingest rate, time per batch of 8, recall,
memory; then the same data partitioned over 1, 2 and 4 local PostgreSQL servers (postgres_fdw foreign partitions).

Data and queries are those of ``shield_db_million.py`` (SYNTHETIC clustered SD-shaped latents, 4 x 32 x 32 = 4096
dims, queries = shields moved by 0.9 r so each ball holds its near-duplicate group). Servers are private embedded
ones on Unix sockets in $SHIELD_PG_BENCH (default /tmp/shield_pg_bench), deleted at the end. Run it niced:

    nice -n 10 python -m benchmarks.shield_db_postgres [--rows 100000] [--servers 1,2,4] [--reps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import shield_db_million as million
from shield_db.database import ShieldDatabase
from shield_db.postgres.cells import touched_cells
from shield_db.postgres.server import EmbeddedServer
from shield_db.postgres.store import PostgresShieldStore
from shield_db.projection import features
from shield_db.source import DatabaseShields

HERE = Path(__file__).resolve().parent

ROOT = Path(os.environ.get("SHIELD_PG_BENCH", "/tmp/shield_pg_bench"))
COMMIT_ROWS = 8192
RESULTS = HERE / "results"


def server_rss_mb() -> float:
    """Resident memory of every PostgreSQL process of this machine's 'postgres' user (our servers)."""
    out = subprocess.run(["ps", "-u", "postgres", "-o", "rss="], check=False, capture_output=True, text=True).stdout
    return sum(int(x) for x in out.split()) / 1024


def load_data(rows: int) -> np.ndarray:
    return np.concatenate([chunk for _, chunk in million.generate(rows)])


def build_file_db(data: np.ndarray) -> tuple[DatabaseShields, float]:
    folder = ROOT / "file_db"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    db = ShieldDatabase(folder)
    with db.writer(item_shape=million.ITEM_SHAPE) as w:
        w.commit_rows = COMMIT_ROWS
        w.add_batch([f"s{i}" for i in range(len(data))], [f"{i:064x}" for i in range(len(data))], data)
    source = DatabaseShields(db.snapshot(check_sha=False))
    source.snapshot.wait_held()  # the steady state: latents held in RAM up to the budget
    return source, time.perf_counter() - t0


def build_postgres(data: np.ndarray, n_servers: int, port0: int) -> dict:
    servers = [EmbeddedServer(ROOT / f"pg{n_servers}_{i}", port=port0 + i).start() for i in range(n_servers)]
    store = PostgresShieldStore(servers[0].dsn(), "bench")
    store.create(million.ITEM_SHAPE, shards=[None] + [s.dsn() for s in servers[1:]])
    t0 = time.perf_counter()
    with store.writer() as w:
        w.commit_rows = COMMIT_ROWS
        for start in range(0, len(data), COMMIT_ROWS):
            part = data[start:start + COMMIT_ROWS]
            w.add_batch([f"s{start + i}" for i in range(len(part))],
                        [f"{start + i:064x}" for i in range(len(part))], part)
        w.flush()
        t1 = time.perf_counter()
    t2 = time.perf_counter()
    with store.connect() as conn:
        size = conn.execute("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON "
                            "n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind IN ('r', 'm')",
                            (store.schema,)).fetchone()[0] or 0
    remote = 0
    for i, s in enumerate(servers[1:], start=1):
        with PostgresShieldStore(s.dsn(), "bench").connect() as conn:
            remote += conn.execute("SELECT pg_total_relation_size(%s)", (f"{store.schema}.shields_p{i}",)).fetchone()[0]
    return {"servers": servers, "store": store, "ingest_s": t1 - t0, "refit_s": t2 - t1,
            "on_disk_mb": float(size + remote) / 2 ** 20}


def query_stats(src, q: np.ndarray) -> dict:
    """Cells touched and candidates returned by the SQL filter for one batch (for the table)."""
    rho = src._rho(q, million.RADIUS)
    fq, _ = features(q, *src.basis)
    touched = touched_cells(fq, rho, src.centres, src.radii)
    rows, _ = src._candidates(q, rho)
    return {"cells": int(touched.sum()), "cells_total": len(src.cell_ids), "candidates": len(rows),
            "parts": len(set(src.cell_parts[touched].tolist()))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--servers", default="1,2,4")
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args()
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    os.chmod(ROOT, 0o711)
    t0 = time.perf_counter()
    data = load_data(args.rows)
    print(f"generated {args.rows} x {million.DIM} in {time.perf_counter() - t0:.1f}s", flush=True)
    file_src, file_build_s = build_file_db(data)
    print(f"file db built in {file_build_s:.1f}s", flush=True)
    rng = np.random.default_rng(123)
    batches = []
    for _ in range(args.reps):
        q = million.queries(file_src.snapshot, rng)
        batches.append((q, set(million.truth(file_src.snapshot, q, million.RADIUS).tolist())))
    n_true = sum(len(t) for _, t in batches)
    results = {"rows": args.rows, "dim": million.DIM, "radius": million.RADIUS, "reps": args.reps,
               "true_hits": n_true, "file_db": {"build_s": file_build_s}, "postgres": {}}

    def run(name, search):
        times, found = [], 0
        for q, ref in batches:
            search(q)  # warm
            t = time.perf_counter()
            got = set(np.asarray(search(q)).tolist())
            times.append(time.perf_counter() - t)
            found += len(got & ref)
            assert got == ref, (name, len(got ^ ref))
        return {"median_s": float(np.median(times)), "per_batch_s": times, "recall": found / max(1, n_true)}

    results["file_db"].update(run("file_db", lambda q: file_src.within_rows(torch.from_numpy(q), million.RADIUS)))
    print("file db", results["file_db"], flush=True)
    port0 = 56000 + os.getpid() % 500 * 8
    for n in [int(x) for x in args.servers.split(",")]:
        built = build_postgres(data, n, port0)
        port0 += n
        try:
            measure_postgres(results, built, n, args, run, batches)
        finally:
            for s in built["servers"]:
                s.stop()
                shutil.rmtree(s.data_dir, ignore_errors=True)
    finish(results, args, file_build_s)


def measure_postgres(results, built, n, args, run, batches):
    src = built["store"].source()
    rss_before = million.rss_mb()
    entry = {"ingest_s": built["ingest_s"], "ingest_rows_per_s": args.rows / built["ingest_s"],
             "refit_s": built["refit_s"], "on_disk_mb": built["on_disk_mb"]}
    entry.update(run(f"postgres x{n}", lambda q: src.within_rows(torch.from_numpy(q), million.RADIUS)))
    entry["query"] = query_stats(src, batches[0][0])
    entry["client_rss_mb"] = million.rss_mb()["VmRSS"]
    entry["client_rss_before_mb"] = rss_before["VmRSS"]
    entry["servers_rss_mb"] = server_rss_mb()
    results["postgres"][n] = entry
    print(f"postgres x{n}", json.dumps(entry), flush=True)
    src.close()


def finish(results, args, file_build_s):
    results["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [("| store | servers | recall | s / batch of 8 (median) | ingest rows/s | refit s | cells touched | "
              "candidates | on disk MB |"), "|---|---|---|---|---|---|---|---|---|",
             (f"| shield_db files | - | {results['file_db']['recall']:.3f} | {results['file_db']['median_s']:.3f} | "
              f"{args.rows / file_build_s:.0f} | (in build) | - | - | - |")]
    for n, e in results["postgres"].items():
        lines.append(f"| PostgreSQL (cube) | {n} | {e['recall']:.3f} | {e['median_s']:.3f} | "
                     f"{e['ingest_rows_per_s']:.0f} | {e['refit_s']:.1f} | {e['query']['cells']}/"
                     f"{e['query']['cells_total']} ({e['query']['parts']} partitions) | {e['query']['candidates']} | "
                     f"{e['on_disk_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shield_db_postgres.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "shield_db_postgres.md").write_text(table + "\n")
    shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
