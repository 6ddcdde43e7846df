"""Exact range search over 1M shields x 4096 dims: shield_db vs FAISS IndexFlatL2 and IndexIVFFlat (nprobe 1, 2, 10).

Data is SYNTHETIC and clustered, shaped like SD latents (4 x 32 x 32 = 4096 dims): 1000 cluster centres and
within-cluster variations are smooth random fields with the natural-image power law (power ~ 1/(1+f)^2 per
channel; each item mixes two of 16384 such fields with Gaussian weights), plus white detail (std 0.1); items come in near-duplicate groups of 1-4 (as real image sets do). Queries are
random shields moved by a random perturbation of norm 0.9 r, so each query ball holds a few shields (its group).

Everything lives under $SHIELD_DB_BENCH (default /tmp/shield_db_bench), never in the repository; stages that
finished are reused (build timings are recorded when built). The query comparison runs all variants in this
one process, interleaved on the same query batches.

    python -m benchmarks.shield_db_million [--rows 1000000] [--reps 5]     (from the repository root)

``python -m benchmarks.shield_db_side_by_side`` builds the same folder and measures the device-path screen, FAISS
and PostgreSQL beside shield_db in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from shield_db import manifest
from shield_db.database import ShieldDatabase
from shield_db.snapshot import Snapshot
from shield_db.source import DatabaseShields

ITEM_SHAPE = (4, 32, 32)
DIM = int(np.prod(ITEM_SHAPE))
CLUSTERS = 1000
CHUNK = 65536
GEN_CHUNK = 8192
POOL = 16384
RADIUS = 20.0
NLIST = 1000
ROOT = Path(os.environ.get("SHIELD_DB_BENCH", "/tmp/shield_db_bench"))
_KEEP = []
RESULTS = Path(__file__).resolve().parent / "results"


def smooth_fields(gen: torch.Generator, n: int, std: float) -> torch.Tensor:
    """``n`` random fields [4, 32, 32] with power ~ 1/(1+f)^2 per channel, per-element std ``std``."""
    fy = torch.fft.fftfreq(32)[:, None] * 32
    fx = torch.fft.rfftfreq(32)[None, :] * 32
    amp = 1.0 / (1.0 + (fx.square() + fy.square()).sqrt())
    spec = torch.complex(torch.randn(n, 4, 32, 17, generator=gen), torch.randn(n, 4, 32, 17, generator=gen)) * amp
    field = torch.fft.irfft2(spec, s=(32, 32))
    return field * (std / field.std())


def generate(rows: int, seed: int = 0, first: int = 0):
    """Yield chunks ``(start, fp16 latents [n, 4, 32, 32])`` of the synthetic clustered set, from row ``first``.

    item = centre[k] + (a * pool[i] + b * pool[j]) + white detail, with ``a, b ~ N(0, 1/2)``: the smooth
    within-cluster variation mixes two of 16384 precomputed power-law fields (cheap, same spectrum). Each
    chunk has its own random stream, so a stopped build resumes where it stopped.
    """
    gen = torch.Generator().manual_seed(seed)
    centres = smooth_fields(gen, CLUSTERS, 1.0).reshape(CLUSTERS, DIM)
    pool = smooth_fields(gen, POOL, 0.5).reshape(POOL, DIM)
    for start in range(first - first % GEN_CHUNK, rows, GEN_CHUNK):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start + 1)
        n = min(GEN_CHUNK, rows - start)
        group = torch.randint(1, 5, (n,), generator=gen).tolist()
        leader, i = np.zeros(n, dtype=np.int64), 0
        while i < n:  # groups of 1-4 near-duplicates of a leader
            leader[i:i + group[i]] = i
            i += group[i]
        leader = torch.from_numpy(leader)
        w = torch.randn(n, 2, generator=gen) * 0.5 ** 0.5
        pick = torch.randint(0, POOL, (n, 2), generator=gen)
        base = centres[torch.randint(0, CLUSTERS, (n,), generator=gen)]
        base += w[:, :1] * pool[pick[:, 0]] + w[:, 1:] * pool[pick[:, 1]]
        base += 0.1 * torch.randn(n, DIM, generator=gen)
        items = base[leader]
        dup = (torch.arange(n) != leader).nonzero().flatten()
        items[dup] += 0.05 * torch.randn(len(dup), DIM, generator=gen)
        yield start, items.reshape(n, *ITEM_SHAPE).to(torch.float16).numpy()


def rss_mb() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) / 1024
    return out


def build_ours(rows: int, record: dict) -> ShieldDatabase:
    """Store the latents (resuming a stopped run) and build shield_db's feature index (timed separately)."""
    db = ShieldDatabase(ROOT / "db")
    if db.exists() and "ours_build_s" in record:
        return db
    t0 = time.perf_counter()
    with db.writer(item_shape=ITEM_SHAPE) as txn:
        txn.commit_rows = CHUNK
        stored = txn.rows()
        for start, chunk in generate(rows, first=stored):
            keep = slice(max(0, stored - start), len(chunk))
            names = [f"synthetic/{start + i:07d}" for i in range(len(chunk))][keep]
            txn.add_batch(names, [f"{start + i:064x}" for i in range(len(chunk))][keep], chunk[keep])
            print(f"  stored {start + len(chunk)} / {rows}", flush=True)
        txn.flush()
        (ROOT / "stored.done").touch()  # lets a --ivf-only process start while the feature index is built
        t1 = time.perf_counter()
    record["store_s"] = record.get("store_s", 0.0) + t1 - t0
    record["ours_build_s"] = time.perf_counter() - t1  # checksums + PCA fit + features + IndexFlatL2 add + save
    return db


def chunks_of(snap):
    """``(first row, fp16 rows)`` in chunks, read with positioned reads (nothing stays mapped, so evict() works)."""
    for start in range(0, snap.rows, CHUNK):
        yield start, snap.read_rows(np.arange(start, min(snap.rows, start + CHUNK)))


def evict(snap):
    """Drop the shards from the page cache: the next shield_db query reads its candidates from disk."""
    for shard in snap.shards:
        fd = os.open(shard.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def build_ivf(snap, record: dict):
    """IndexIVFFlat, nlist 1000, k-means on 40k rows (10 iterations), lists memory-mapped on disk (16 GB float32)."""
    path, rec = ROOT / "ivf.faiss", ROOT / "ivf_record.json"
    if path.exists() and rec.exists():
        record.update(json.loads(rec.read_text()))
        return faiss.read_index(str(path))  # its OnDiskInvertedLists memory-map ivf.lists
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    sample = np.sort(rng.choice(snap.rows, size=min(snap.rows, 40 * NLIST), replace=False))
    train = snap.read_rows(sample).reshape(len(sample), -1).astype(np.float32)
    quantizer = faiss.IndexFlatL2(DIM)
    index = faiss.IndexIVFFlat(quantizer, DIM, NLIST)
    index.cp.niter = 10
    index.train(train)
    del train
    invlists = faiss.OnDiskInvertedLists(NLIST, index.code_size, str(ROOT / "ivf.lists"))
    index.replace_invlists(invlists, False)
    _KEEP.append(invlists)  # the index does not own it: keep it alive
    for start, chunk in chunks_of(snap):
        index.add_with_ids(chunk.reshape(len(chunk), -1).astype(np.float32), np.arange(start, start + len(chunk)))
        print(f"  ivf added {start + len(chunk)}", flush=True)
    faiss.write_index(index, str(path))
    rec.write_text(json.dumps({"ivf_build_s": time.perf_counter() - t0}))
    record.update(json.loads(rec.read_text()))
    return index


def wait_for_rows(db: ShieldDatabase, rows: int):
    """Block until ``rows`` latents are committed (lets the IVF build run beside shield_db's index build)."""
    while True:  # no lock: the writer holds it for its whole build; manifest renames are atomic, shards immutable
        if (ROOT / "stored.done").exists():
            snap = Snapshot(db.folder, manifest.load(db.folder), check_sha=False, load_index=False)
            if snap.rows >= rows:
                return snap
        time.sleep(30)


def flat_range(snap, q: np.ndarray, radius: float):
    """Exact IndexFlatL2 range search, one chunk at a time (16 GB of float32 does not fit this machine)."""
    hits, search_s, convert_s = [], 0.0, 0.0
    for start, chunk in chunks_of(snap):
        t0 = time.perf_counter()
        index = faiss.IndexFlatL2(DIM)
        index.add(chunk.reshape(len(chunk), -1).astype(np.float32))
        t1 = time.perf_counter()
        _, _, ids = index.range_search(q, radius * radius)
        search_s += time.perf_counter() - t1
        convert_s += t1 - t0
        hits.append(ids + start)
    return np.unique(np.concatenate(hits)), search_s, convert_s


def truth(snap, q: np.ndarray, radius: float) -> np.ndarray:
    """Exact float64 brute force on the candidates of a generous IndexFlatL2 pass."""
    rows, _, _ = flat_range(snap, q, radius * 1.01 + 1e-3)
    z = snap.read_rows(rows).reshape(len(rows), -1).astype(np.float64)
    d = np.sqrt(((z[None] - q.astype(np.float64)[:, None]) ** 2).sum(-1))
    return rows[(d <= radius).any(0)]


def queries(snap, rng) -> np.ndarray:
    pick = rng.choice(snap.rows, size=8, replace=False)
    z = snap.read_rows(np.sort(pick)).reshape(8, -1).astype(np.float32)
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    p = smooth_fields(gen, 8, 1.0).reshape(8, -1) + torch.randn(8, DIM, generator=gen)
    p = p / p.norm(dim=1, keepdim=True) * 0.9 * RADIUS
    return np.ascontiguousarray(z + p.numpy())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-ivf", action="store_true")
    parser.add_argument("--ivf-only", action="store_true", help="only build the IVF baseline (in a second process)")
    args = parser.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    if args.ivf_only:
        (ROOT / "ivf.building").touch()
        build_ivf(wait_for_rows(ShieldDatabase(ROOT / "db"), args.rows), {})
        return
    record_path = ROOT / "build_record.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if record.get("rows") != args.rows:
        record = {"rows": args.rows}
    db = build_ours(args.rows, record)
    record_path.write_text(json.dumps(record))
    before = rss_mb()
    t0 = time.perf_counter()
    source = DatabaseShields(db.snapshot(check_sha=False))
    open_s = time.perf_counter() - t0
    source.snapshot.wait_held()  # measured searches start from the steady state (latents held up to the budget)
    after_open = rss_mb()
    snap = source.snapshot
    while not args.skip_ivf and (ROOT / "ivf.building").exists() and not (ROOT / "ivf_record.json").exists():
        time.sleep(20)  # a second process (--ivf-only) is building it
    ivf = None if args.skip_ivf else build_ivf(snap, record)
    record_path.write_text(json.dumps(record))
    print(json.dumps(record))
    rng = np.random.default_rng(123)
    methods = ["shield_db", "flat"] + ([] if ivf is None else ["ivf1", "ivf2", "ivf10"])
    stats = {m: {"t": [], "found": 0, "extra": 0} for m in methods}
    cold = []
    n_true, flat_convert = 0, []
    for rep in range(args.reps):
        q = queries(snap, rng)
        ref = set(truth(snap, q, RADIUS).tolist())
        n_true += len(ref)
        for m in methods[rep % len(methods):] + methods[:rep % len(methods)]:
            t0 = time.perf_counter()
            if m == "shield_db":  # first from a cold page cache, then the same batch warm (the timed one)
                evict(snap)
                t0 = time.perf_counter()
                source.within_rows(torch.from_numpy(q), RADIUS)
                cold.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                found = source.within_rows(torch.from_numpy(q), RADIUS)
                dt = time.perf_counter() - t0
            elif m == "flat":
                found, dt, conv = flat_range(snap, q, RADIUS)
                flat_convert.append(conv)
            else:
                ivf.nprobe = int(m[3:])
                _, _, found = ivf.range_search(q, RADIUS * RADIUS)
                dt = time.perf_counter() - t0
            found = set(np.asarray(found).tolist())
            stats[m]["t"].append(dt)
            stats[m]["found"] += len(found & ref)
            stats[m]["extra"] += len(found - ref)
        print(f"rep {rep}: {len(ref)} true hits; shield_db cold {cold[-1]:.3f}s, " +
              ", ".join(f"{m} {stats[m]['t'][-1]:.3f}s" for m in methods), flush=True)
    mem = rss_mb()
    fp16_mb = args.rows * DIM * 2 / 2 ** 20
    index_mb = snap.index.rows * snap.index.index.d * 4 / 2 ** 20
    lines = ["| method | recall | s / batch of 8 (median) | build s | RAM for search |", "|---|---|---|---|---|"]
    med = {m: float(np.median(stats[m]["t"])) for m in methods}
    for m in methods:
        recall = stats[m]["found"] / max(1, n_true)
        build = {"shield_db": record.get("ours_build_s"), "flat": float(np.median(flat_convert)),
                 }.get(m, record.get("ivf_build_s"))
        ram = {"shield_db": f"{index_mb:.0f} MB features + mmap", "flat": f"{fp16_mb * 2:.0f} MB float32 (run in chunks)"}.get(
            m, f"{NLIST * DIM * 4 / 2**20:.0f} MB centroids + mmap lists")
        lines.append(f"| {m} | {recall:.3f} | {med[m]:.3f} | {build:.1f} | {ram} |")
        if m == "shield_db":
            lines.append(f"| shield_db, cold page cache | {recall:.3f} | {float(np.median(cold)):.3f} | same | same |")
    table = "\n".join(lines)
    summary = {
        "rows": args.rows, "dim": DIM, "radius": RADIUS, "reps": args.reps, "true_hits": n_true,
        "median_s": med, "speedup_vs_flat": med["flat"] / med["shield_db"],
        "shield_db_cold_s": cold, "shield_db_cold_median_s": float(np.median(cold)),
        "speedup_vs_flat_cold": med["flat"] / float(np.median(cold)),
        "per_batch_s": {m: stats[m]["t"] for m in methods},
        "open_s": open_s, "rss_before_mb": before, "rss_after_open_mb": after_open, "rss_end_mb": mem,
        "fp16_latents_mb": fp16_mb, "feature_index_mb": index_mb,
        "ours_on_disk_mb": sum(p.stat().st_size for p in (ROOT / "db").rglob("*") if p.is_file()) / 2 ** 20,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "build": record,
    }
    print(table)
    print(json.dumps(summary, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shield_db_million.json").write_text(json.dumps(summary, indent=1))
    (RESULTS / "shield_db_million.md").write_text(table + "\n")
    plot(med, stats, n_true)


def plot(med: dict, stats: dict, n_true: int):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, seconds in med.items():
        ax.scatter(seconds, stats[m]["found"] / max(1, n_true), label=m)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per batch of 8 queries (median)")
    ax.set_ylabel("recall of in-radius shields")
    ax.legend()
    ax.set_title("1M x 4096 synthetic clustered shields, range search")
    fig.tight_layout()
    fig.savefig(RESULTS / "shield_db_million.png", dpi=120)


if __name__ == "__main__":
    main()
