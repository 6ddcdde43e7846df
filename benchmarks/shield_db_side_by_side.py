"""One process, side by side: 1M shields x 4096 dims searched by the device-path screen, shield_db's CPU screen,
FAISS, and the embedded PostgreSQL source (issue #18, "What must be shown").

Data and queries are ``shield_db_million.py``'s (SYNTHETIC clustered SD-shaped latents, 4 x 32 x 32 = 4096 dims,
fp16; queries = stored shields moved by 0.9 r, r = 20, so each ball holds its near-duplicate group). Three stages,
each resumable, everything under $SHIELD_DB_BENCH (default /tmp/shield_db_bench), never in the repository:

    nice -n 10 python -m benchmarks.shield_db_side_by_side build                     # shield_db: store + index
    nice -n 10 python -m benchmarks.shield_db_side_by_side pg-ingest --pg-rows 262144  # PostgreSQL, a prefix
    nice -n 10 python -m benchmarks.shield_db_side_by_side measure --reps 7          # all paths, one process
    nice -n 10 python -m benchmarks.shield_db_side_by_side split --reps 7            # CPU per step, device path

``build`` is ``shield_db_million.py``'s build (same folder, so that benchmark reuses it). ``pg-ingest`` loads the
first ``--pg-rows`` rows of the same data into a private PostgreSQL server (the pack's embedded default:
Debian's binaries, ``cube`` features) and times the ingest (COPY in commits of 8192) and the refit that ends
the build separately. ``measure`` opens everything in one process and runs, interleaved on the same batches of 8:

- ``device``: ``guidance.feature_screen.FeatureScreen`` over the 129-number features (one matmul per batch, CPU
  torch here; on a GPU the same code), then the exact check of the candidates (``shield_db.exact.within_any``, on the queries' device);
- ``index``: ``DatabaseShields.within_rows`` as it searches CPU queries today (cascade screen, same check);
- ``faiss``: FAISS ``IndexFlatL2.range_search`` over the same features, same check;
- ``postgres``: ``PostgresShields.within_rows`` on the prefix (its own queries, drawn from the prefix).

Truth: float64 distances over every stored row (one pass for all batches). Recall must be 1.000 everywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks import shield_db_million as million

ROWS = 1_000_000
PG_COMMIT_ROWS = 8192
PG_SET = "bench"
RESULTS = Path(__file__).resolve().parent / "results"


def pg_root() -> Path:
    return million.ROOT / "pg"


def cpu_of_pids(pids) -> float:
    """User + system CPU seconds of processes (own and reaped children), from /proc."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def server_pids(server) -> list[int]:
    """The postmaster of ``server`` and its live children (backends, writers)."""
    master = int((server.pgdata / "postmaster.pid").read_text().split()[0])
    kids = subprocess.run(["ps", "--ppid", str(master), "-o", "pid="], check=False, capture_output=True, text=True).stdout
    return [master] + [int(p) for p in kids.split()]


def server_rss_mb(server) -> float:
    total = 0
    for pid in server_pids(server):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def pg_server():
    from shield_db.postgres.server import EmbeddedServer
    root = pg_root()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(million.ROOT, 0o711)
    os.chmod(root, 0o711)
    return EmbeddedServer(root / "server", port=56990).start()


def pg_disk_mb(store) -> float:
    with store.connect() as conn:
        size = conn.execute("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON "
                            "n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind IN ('r', 'm')",
                            (store.schema,)).fetchone()[0]
    return float(size or 0) / 2 ** 20


def pg_ingest(rows: int, stop_after_s: float) -> None:
    """Load the first ``rows`` rows into the embedded server (resuming a stopped run; commits of 8192), stopping
    early after ``stop_after_s`` s of wall time; ingest and the refit that ends the build timed apart."""
    from shield_db.postgres.store import PostgresShieldStore
    progress_path, record_path = pg_root() / "progress.json", pg_root() / "record.json"
    server = pg_server()
    store = PostgresShieldStore(server.dsn(), PG_SET)
    if not store.exists():
        store.create(million.ITEM_SHAPE)
        progress_path.write_text(json.dumps({"rows": 0, "ingest_s": 0.0, "ingest_cpu_s": 0.0, "log": []}))
    progress = json.loads(progress_path.read_text())
    server_cpu0 = cpu_of_pids(server_pids(server))
    t_start = time.perf_counter()
    with store.writer() as w:
        w.commit_rows = PG_COMMIT_ROWS
        stored = w.next_row
        progress["rows"] = stored  # committed rows (a killed run's last commit may have been rolled back)
        for start, chunk in million.generate(rows, first=stored):
            if time.perf_counter() - t_start > stop_after_s:
                break
            t, c = time.perf_counter(), time.process_time()
            w.add_batch([f"synthetic/{start + i:07d}" for i in range(len(chunk))],
                        [f"{start + i:064x}" for i in range(len(chunk))], chunk)
            w.flush()
            progress["ingest_s"] += time.perf_counter() - t
            progress["ingest_cpu_s"] += time.process_time() - c
            progress["rows"] = start + len(chunk)
            progress["log"].append([progress["rows"], round(progress["ingest_s"], 2), list(os.getloadavg())])
            progress_path.write_text(json.dumps(progress))
            print(f"  postgres stored {progress['rows']} / {rows}: {progress['ingest_s']:.1f}s of ingest", flush=True)
        t_refit, c_refit = time.perf_counter(), time.process_time()
        server_cpu_ingest = cpu_of_pids(server_pids(server)) - server_cpu0
    refit_s, refit_cpu = time.perf_counter() - t_refit, time.process_time() - c_refit  # finish(): the refit
    server_cpu_total = cpu_of_pids(server_pids(server)) - server_cpu0
    n = progress["rows"]
    record = {"rows": n, "target_rows": rows, "commit_rows": PG_COMMIT_ROWS, "ingest_s": progress["ingest_s"],
              "ingest_client_cpu_s": progress["ingest_cpu_s"], "server_cpu_s_last_run_ingest": server_cpu_ingest,
              "refit_s": refit_s, "refit_client_cpu_s": refit_cpu,
              "refit_server_cpu_s": server_cpu_total - server_cpu_ingest,
              "ingest_rows_per_s": n / progress["ingest_s"],
              "ingest_mb_per_s": n * million.DIM * 2 / 2 ** 20 / progress["ingest_s"],
              "on_disk_mb_after_refit": pg_disk_mb(store), "load_end": os.getloadavg(),
              "note": progress.get("note", "")}
    record_path.write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)


def rss() -> float:
    return million.rss_mb()["VmRSS"]


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), wall s, CPU s of this process, all threads)``."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t, time.process_time() - c


def pg_queries(snap, rng, rows: int) -> np.ndarray:
    """``shield_db_million.queries`` drawn from the first ``rows`` rows (the PostgreSQL prefix)."""
    pick = np.sort(rng.choice(rows, size=8, replace=False))
    z = snap.read_rows(pick).reshape(8, -1).astype(np.float32)
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    p = million.smooth_fields(gen, 8, 1.0).reshape(8, -1) + torch.randn(8, million.DIM, generator=gen)
    return np.ascontiguousarray(z + (p / p.norm(dim=1, keepdim=True) * 0.9 * million.RADIUS).numpy())


def truth_and_flat(snap, batches: list, limits: list, radius: float, flat_batches: int, chunk: int = 32768):
    """One pass over every stored row: float64 truth per batch (rows below ``limits[i]`` only), and the per-batch
    time of FAISS ``IndexFlatL2.range_search`` over the full latents (float32, chunk by chunk) with what it found,
    for the first ``flat_batches`` batches.

    Truth: float32 distances with Higham's bound ``2.2 gamma_{D+2} (||q||^2 + ||z||^2)`` as a prefilter that
    cannot drop a hit, then float64 differences for the survivors.
    """
    q_all = torch.from_numpy(np.concatenate(batches)).float()
    q64 = q_all.double()
    q_sq = q_all.square().sum(1)
    g = 2.2 * (million.DIM + 2) * 2.0 ** -24 / (1 - (million.DIM + 2) * 2.0 ** -24)
    truth = [set() for _ in batches]
    flat_found = [set() for _ in batches]
    flat_s, convert_s = [0.0] * len(batches), 0.0
    owner = np.repeat(np.arange(len(batches)), [len(b) for b in batches])
    for start in range(0, snap.rows, chunk):
        t = time.perf_counter()
        z16 = snap.read_rows(np.arange(start, min(snap.rows, start + chunk)))
        z = torch.from_numpy(z16.reshape(len(z16), -1)).float()
        index = faiss.IndexFlatL2(million.DIM)
        index.add(z.numpy())
        convert_s += time.perf_counter() - t
        for i, q in enumerate(batches[:flat_batches]):
            t = time.perf_counter()
            _, _, ids = index.range_search(q, radius * radius)
            flat_s[i] += time.perf_counter() - t
            flat_found[i] |= set((ids + start).tolist())
        z_sq = z.square().sum(1)
        d2 = q_sq[:, None] + z_sq[None, :] - 2 * (q_all @ z.T)
        near = (d2 <= radius * radius + g * (q_sq[:, None] + z_sq[None, :])).nonzero().tolist()
        for b, j in near:
            i, row = int(owner[b]), start + j
            if row < limits[i] and float((z[j].double() - q64[b]).square().sum()) <= radius * radius:
                truth[i].add(row)
        print(f"  truth {min(snap.rows, start + chunk)} / {snap.rows}", flush=True)
        del z, index, d2
    return truth, flat_found, flat_s, convert_s


def device_path(source, screen, q: np.ndarray, radius: float):
    """``DatabaseShields``' device path, forced on the CPU: features, one ``addmm`` screen, exact check."""
    index = source.snapshot.index
    feats, norms = million_features(q, index)
    found = screen.candidates(torch.from_numpy(feats), torch.from_numpy(norms), radius)
    return source.rows[found.numpy()]


def million_features(q: np.ndarray, index):
    from shield_db.projection import features
    return features(q, index.mu, index.a)


def faiss_path(source, q: np.ndarray, radius: float):
    """The same features searched by FAISS's own ``IndexFlatL2.range_search`` (the path before the two-pass screen)."""
    from shield_db.projection import FEATURE_REL_ERROR, search_radius_sq
    index = source.snapshot.index
    feats, norms = million_features(q, index)
    max_feat_sq = (index.max_norm * (1 + FEATURE_REL_ERROR)) ** 2
    r2 = max(search_radius_sq(radius, float(n), index.max_norm, float((n * (1 + FEATURE_REL_ERROR)) ** 2),
                              max_feat_sq, feats.shape[1]) for n in norms)
    _, _, ids = index.index.range_search(np.ascontiguousarray(feats), np.float32(r2))
    return np.unique(ids).astype(np.int64)


def pg_cells(src, q: np.ndarray, radius: float) -> list[int]:
    """``[cells touched, cells]`` for one batch (the triangle-inequality pruning of shield_db.postgres.cells)."""
    from shield_db.postgres.cells import touched_cells
    from shield_db.projection import features
    fq, _ = features(q, *src.basis)
    return [int(touched_cells(fq, src._rho(q, radius), src.centres, src.radii).sum()), len(src.cell_ids)]


def verified(source, q: np.ndarray, cand: np.ndarray, radius: float) -> np.ndarray:
    hits = [part[inside] for part, inside in source._verified(torch.from_numpy(q), cand, radius)]
    return np.concatenate(hits) if hits else np.zeros(0, np.int64)


def measure(reps: int) -> None:
    from shield_db.database import ShieldDatabase
    from shield_db.source import DatabaseShields
    radius = million.RADIUS
    record = json.loads((million.ROOT / "build_record.json").read_text())
    pg_record_path = pg_root() / "record.json"
    pg_record = json.loads(pg_record_path.read_text()) if pg_record_path.exists() else None
    out = {"rows": int(record["rows"]), "dim": million.DIM, "radius": radius, "reps": reps, "threads": torch.get_num_threads(),
           "load_start": os.getloadavg(), "build": record, "pg_ingest": pg_record, "rss_mb": {"start": rss()}}
    db = ShieldDatabase(million.ROOT / "db")
    source, out["open_s"], out["open_cpu_s"] = timed(lambda: DatabaseShields(db.snapshot(check_sha=False)))
    snap = source.snapshot
    snap.wait_held()  # measured searches start from the steady state (latents held up to the budget)
    out["rss_mb"]["after_open"] = rss()
    screen, out["device_screen_setup_s"], _ = timed(lambda: source.device_screen(torch.device("cpu")))
    out["rss_mb"]["after_device_screen"] = rss()
    cascade, out["index_screen_setup_s"], _ = timed(snap.index.cascade)
    out["rss_mb"]["after_index_cascade"] = rss()
    out["features_mb"] = cascade.full.nbytes / 2 ** 20
    out["coarse_features_mb"] = (cascade.first.nbytes + cascade.full_sq.nbytes) / 2 ** 20
    out["fp16_latents_mb"] = snap.rows * million.DIM * 2 / 2 ** 20
    out["on_disk_mb"] = sum(p.stat().st_size for p in (million.ROOT / "db").rglob("*") if p.is_file()) / 2 ** 20
    pg_src = server = None
    if pg_record:
        from shield_db.postgres.store import PostgresShieldStore
        server = pg_server()
        before = rss()
        pg_src, out["pg_open_s"], _ = timed(lambda: PostgresShieldStore(server.dsn(), PG_SET).source())
        out["rss_mb"]["pg_client_growth"] = rss() - before
        out["pg_rows"] = len(pg_src)
    rng = np.random.default_rng(123)
    batches = [million.queries(snap, rng) for _ in range(reps)]
    pg_batches = [pg_queries(snap, rng, pg_record["rows"]) for _ in range(reps)] if pg_src else []
    limits = [snap.rows] * reps + [pg_record["rows"] if pg_src else 0] * len(pg_batches)
    truth, flat_found, flat_s, convert_s = truth_and_flat(snap, batches + pg_batches, limits, radius, reps)
    out["flat"] = {"per_batch_s": flat_s[:reps], "convert_s_total": convert_s}
    paths = ["device", "index", "faiss"] + (["postgres"] if pg_src else [])
    stats = {p: {"s": [], "cpu_s": [], "screen_s": [], "candidates": [], "found": 0, "extra": 0} for p in paths}
    stats["index_cold"] = {"s": [], "cpu_s": [], "found": 0, "extra": 0}
    for rep in range(reps):
        q, ref = batches[rep], truth[rep]
        source.within_rows(torch.from_numpy(q), radius)  # warm-up: the candidates' pages are cached for every path
        for p in paths[rep % len(paths):] + paths[:rep % len(paths)]:
            if p == "postgres":
                pq, pref = pg_batches[rep], truth[reps + rep]
                pg_src.within_rows(torch.from_numpy(pq), radius)  # warm-up (server buffers, page cache)
                server_cpu = cpu_of_pids(server_pids(server))
                got, dt, dc = timed(pg_src.within_rows, torch.from_numpy(pq), radius)
                stats[p].setdefault("server_cpu_s", []).append(cpu_of_pids(server_pids(server)) - server_cpu)
                dc += stats[p]["server_cpu_s"][-1]  # the feature filter runs in the server's backend
                ref_p = pref
                (cand, _), ds, _ = timed(pg_src._candidates, pq, pg_src._rho(pq, radius))  # SQL part, untimed run
                stats[p]["screen_s"].append(ds)
                stats[p]["candidates"].append(len(cand))
                stats[p].setdefault("cells_touched", []).append(pg_cells(pg_src, pq, radius))
            else:
                if p == "device":
                    cand, ds, dcs = timed(device_path, source, screen, q, radius)
                elif p == "faiss":
                    cand, ds, dcs = timed(faiss_path, source, q, radius)
                else:
                    cand, ds, dcs = timed(source._candidate_rows, q, radius)
                hits, dv, dcv = timed(verified, source, q, cand, radius)
                got, dt, dc = hits, ds + dv, dcs + dcv
                stats[p]["screen_s"].append(ds)
                stats[p].setdefault("screen_cpu_s", []).append(dcs)
                stats[p]["candidates"].append(len(cand))
                ref_p = ref
            got = set(np.asarray(got).tolist())
            stats[p]["s"].append(dt)
            stats[p]["cpu_s"].append(dc)
            stats[p]["found"] += len(got & ref_p)
            stats[p]["extra"] += len(got - ref_p)
        million.evict(snap)
        got, dt, dc = timed(source.within_rows, torch.from_numpy(q), radius)
        got = set(got.tolist())
        stats["index_cold"]["s"].append(dt)
        stats["index_cold"]["cpu_s"].append(dc)
        stats["index_cold"]["found"] += len(got & ref)
        stats["index_cold"]["extra"] += len(got - ref)
        print(f"rep {rep}: {len(ref)} true hits; " + ", ".join(f"{p} {stats[p]['s'][-1]:.3f}s" for p in stats),
              flush=True)
    n_true = sum(len(truth[i]) for i in range(reps))
    n_true_pg = sum(len(truth[reps + i]) for i in range(len(pg_batches)))
    flat_hits = sum(len(flat_found[i] & truth[i]) for i in range(reps))
    out["true_hits"], out["true_hits_pg"] = n_true, n_true_pg
    out["flat"].update(median_s=float(np.median(flat_s[:reps])), recall=flat_hits / max(1, n_true),
                       extra=sum(len(flat_found[i] - truth[i]) for i in range(reps)))
    for p, st in stats.items():
        total = n_true_pg if p == "postgres" else n_true
        st["recall"] = st["found"] / max(1, total)
        st["median_s"] = float(np.median(st["s"]))
        st["median_cpu_s"] = float(np.median(st["cpu_s"]))
        if st.get("screen_s"):
            st["median_screen_s"] = float(np.median(st["screen_s"]))
            st["median_candidates"] = float(np.median(st["candidates"]))
    out["paths"] = stats
    out["rss_mb"]["end"] = rss()
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if server is not None:
        out["pg_server_rss_mb"] = server_rss_mb(server)
        from shield_db.postgres.store import PostgresShieldStore
        out["pg_on_disk_mb"] = pg_disk_mb(PostgresShieldStore(server.dsn(), PG_SET))
        pg_src.close()
    out["load_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shield_db_side_by_side.json").write_text(json.dumps(out, indent=1))
    table = side_by_side_table(out)
    (RESULTS / "shield_db_side_by_side.md").write_text(table + "\n")
    print(table)


def side_by_side_table(out: dict) -> str:
    rows_mb = out["fp16_latents_mb"]
    lines = ["| path | shields | recall | wall s / batch of 8 (median) | CPU s (median) | screen s | candidates |",
             "|---|---|---|---|---|---|---|"]
    names = {"device": "device path (`FeatureScreen`, CPU torch)", "index": "shield_db today (cascade CPU screen)",
             "faiss": "FAISS `range_search` on the features", "index_cold": "shield_db today, cold page cache",
             "postgres": "PostgreSQL embedded (cube)"}
    for p, st in out["paths"].items():
        n = out.get("pg_rows") if p == "postgres" else out["rows"]
        screen = f"{st['median_screen_s']:.3f}" if "median_screen_s" in st else "-"
        cands = f"{st['median_candidates']:.0f}" if "median_candidates" in st else "-"
        lines.append(f"| {names[p]} | {n:,} | {st['recall']:.3f} | {st['median_s']:.3f} | {st['median_cpu_s']:.3f} | "
                     f"{screen} | {cands} |")
    f = out["flat"]
    lines.append(f"| FAISS `IndexFlatL2` on the full latents (search only) | {out['rows']:,} | {f['recall']:.3f} | "
                 f"{f['median_s']:.3f} | - | - | - |")
    lines.append(f"\nfp16 latents {rows_mb:.0f} MB; features {out['features_mb']:.0f} MB + cascade levels "
                 f"{out['coarse_features_mb']:.0f} MB; RSS {json.dumps({k: round(v) for k, v in out['rss_mb'].items()})}")
    return "\n".join(lines)


def split(reps: int) -> None:
    """CPU time of each step of the device path at 1M (the part a GPU would take over, and the rest)."""
    from shield_db.database import ShieldDatabase
    from shield_db.projection import features
    from shield_db.source import DatabaseShields
    source = DatabaseShields(ShieldDatabase(million.ROOT / "db").snapshot(check_sha=False))
    source.snapshot.wait_held()
    screen = source.device_screen(torch.device("cpu"))
    index = source.snapshot.index
    index.cascade()
    rng = np.random.default_rng(123)
    batches = [million.queries(source.snapshot, rng) for _ in range(reps)]
    out = {"query_features": [], "device_screen": [], "verify_warm": [], "index_screen": []}
    for q in batches:
        (f, n), _, c = timed(features, q, index.mu, index.a)
        out["query_features"].append(c)
        found, _, c = timed(screen.candidates, torch.from_numpy(f), torch.from_numpy(n), million.RADIUS)
        out["device_screen"].append(c)
        cand = source.rows[found.numpy()]
        verified(source, q, cand, million.RADIUS)  # warm the candidates' pages
        out["verify_warm"].append(timed(verified, source, q, cand, million.RADIUS)[2])
        out["index_screen"].append(timed(source._candidate_rows, q, million.RADIUS)[2])
    summary = {"cpu_s": out, "median_cpu_s": {k: float(np.median(v)) for k, v in out.items()},
               "load": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shield_db_side_by_side_split.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["median_cpu_s"]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["build", "pg-ingest", "measure", "split"])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--pg-rows", type=int, default=262144)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--pg-stop-after", type=float, default=1e9, help="pg-ingest: stop adding rows after this "
                        "many seconds (then refit); a later run resumes")
    args = parser.parse_args()
    million.ROOT.mkdir(parents=True, exist_ok=True)
    if args.stage == "build":
        record_path = million.ROOT / "build_record.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        record = record if record.get("rows") == args.rows else {"rows": args.rows}
        cpu = time.process_time()
        million.build_ours(args.rows, record)
        record.setdefault("build_cpu_s", time.process_time() - cpu)
        record_path.write_text(json.dumps(record))
    elif args.stage == "pg-ingest":
        pg_ingest(args.pg_rows, args.pg_stop_after)
    elif args.stage == "split":
        split(args.reps)
    else:
        measure(args.reps)


if __name__ == "__main__":
    main()
