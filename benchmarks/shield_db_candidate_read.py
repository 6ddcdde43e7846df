"""What a GPU leaves on the CPU when SPELL searches a shield database: reading the candidates, next to the check it
no longer does there (issue #18 item 2).

Since the candidates are checked on the queries' device (``shield_db.exact.within_any``), a GPU run keeps on the
CPU only the query features and the positioned reads of the candidates' fp16 latents. This measures both, and the
CPU check for comparison, on a database of random SD-shaped latents (4x32x32 = 4096 dims, 8 KB per row, 3,554
candidates per batch as in the 1M side-by-side run), warm page cache, one and two torch threads; and the same rows
gathered from latents held in RAM (``shield_db.resident``, as a set within the budget is searched):

    python -m benchmarks.shield_db_candidate_read [--rows 200000] [--candidates 3554] [--reps 9]

The database lives under $SHIELD_DB_BENCH (default /tmp/shield_db_bench)/candidate-read-<rows>, never in the
repository. Result: ``benchmarks/results/shield_db_candidate_read.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from shield_db.database import ShieldDatabase
from shield_db.exact import within_any
from shield_db.projection import features

SHAPE = (4, 32, 32)
BUILD_CHUNK = 20000
RESULTS = Path(__file__).resolve().parent / "results"


def database(rows: int) -> ShieldDatabase:
    db = ShieldDatabase(Path(os.environ.get("SHIELD_DB_BENCH", "/tmp/shield_db_bench")) / f"candidate-read-{rows}")
    if db.exists():
        return db
    rng = np.random.default_rng(0)
    with db.writer(item_shape=SHAPE) as txn:
        txn.commit_rows = 65536
        for start in range(0, rows, BUILD_CHUNK):
            stop = min(rows, start + BUILD_CHUNK)
            latents = rng.standard_normal((stop - start, *SHAPE), dtype=np.float32).astype(np.float16)
            txn.add_batch([f"row{i}" for i in range(start, stop)], [f"{i:064x}" for i in range(start, stop)], latents)
    return db


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--candidates", type=int, default=3554)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    snap = database(args.rows).snapshot(check_sha=False)
    held = database(args.rows).snapshot(check_sha=False)
    held.hold_latents(1 << 62)
    rng = np.random.default_rng(1)
    out = {"rows": snap.rows, "candidates": args.candidates, "reps": args.reps, "load_start": os.getloadavg()[0]}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times = {"query_features": [], "read_warm": [], "gather_held": [], "cpu_check": []}
        for _ in range(args.reps):
            rows = np.sort(rng.choice(snap.rows, args.candidates, replace=False))
            snap.read_rows(rows)  # the candidates' pages in the page cache, as in a run's later steps
            t0 = time.perf_counter()
            z = snap.read_rows(rows)
            t1 = time.perf_counter()
            held.read_rows(rows)
            times["gather_held"].append(time.perf_counter() - t1)
            q = z[:8].reshape(8, -1).astype(np.float32) + np.float32(0.01)
            t2 = time.perf_counter()
            features(q, snap.index.mu, snap.index.a)
            t3 = time.perf_counter()
            within_any(torch.from_numpy(q), z, 20.0)
            t4 = time.perf_counter()
            times["read_warm"].append(t1 - t0)
            times["query_features"].append(t3 - t2)
            times["cpu_check"].append(t4 - t3)
        out[f"threads_{threads}_ms"] = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
        print(threads, "thread(s):", {k: round(v, 2) for k, v in out[f"threads_{threads}_ms"].items()}, flush=True)
    out["load_end"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shield_db_candidate_read.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
