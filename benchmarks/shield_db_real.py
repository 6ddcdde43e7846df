"""Exact range search on REAL images: shield_db vs FAISS IndexFlatL2 and IndexIVFFlat (nprobe 1, 2, 10 or --nprobe), misses counted.

Data: Fashion-MNIST (Debian package ``dataset-fashion-mnist``: ``apt-get install dataset-fashion-mnist``), pixels
/ 255 stored as fp16 shields of shape 1x28x28 (784 dims). Up to 70,000 rows are the real train + test images; beyond
that every image is repeated as augmented copies (shift by up to 2 px, horizontal flip, white noise of std 0.01),
e.g. 1,000,000 rows = 70,000 images x 15 variants (the first is the image itself). Each batch: 8 queries = random
stored rows + white noise of std 0.02; the radius is the median over 64 such queries of the distance to their 6th
nearest shield (the query's own image and ~5 neighbours). Truth: float64 distances on a generous exact pass.

Rows of the table, all in this one process, interleaved on the same batches (a random order per batch, the CPU
caches flushed before each method by streaming 256 MB, so none inherits the rows the one before it touched):
shield_db as built (its default feature map and cascade screen, its latents held in RAM within the default budget
of ``shield_db.resident``; a database indexed by an older release is first upgraded by an empty write, timed), the
same reading every candidate from the shards (budget 0), the previous release (128 directions, its two-pass screen), ablations (other
basis sizes ``k`` with today's cascade; ``k=64`` also with the FAISS range search of the release before), flat,
IVF (nlist = sqrt N).
``--repeats R`` times each method R times per batch (caches flushed before each) and keeps the least, so a
sporadic stall of the machine does not move the median. ``--diagnose`` also prints why the screen passes what it
passes (energy captured, residual spread, candidates per query for k = 64/128/256, and how many rows exact
k-means cell pruning would keep: ball, annulus and Voronoi bounds); ``--cells`` only that, on the database's own
features; ``--breakdown`` only where a batch's time goes, stage by stage, beside each stage's floor on this
machine.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m benchmarks.shield_db_real [--rows 60000] [--reps 9] [--repeats 3] [--diagnose]

One thread per method keeps the comparison fair on a shared machine; "CPU ms" (process CPU time) is reported
beside wall time because it is far less disturbed by other jobs.

Everything lives under $SHIELD_DB_BENCH (default /tmp/shield_db_bench)/real-<rows>, never in the repository.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from shield_db.cascade import CHUNK_ROWS, fold_queries, folded_pass, prefix_features, squared_norms
from shield_db.database import ShieldDatabase
from shield_db.exact import within_any
from shield_db.feature_index import PREFIX_WIDTHS, FeatureIndex
from shield_db.projection import FEATURE_REL_ERROR, features, fit_basis, search_radius_sq
from shield_db.resident import ResidentRows
from shield_db.source import DatabaseShields
from shield_db.transaction import DEFAULT_INDEX_DIM, INDEX_DIM_KEY

DATA = Path("/usr/share/datasets/fashion-mnist")
SHAPE = (1, 28, 28)
DIM = 784
QUERY_NOISE = 0.02
COPY_NOISE = 0.01
CHUNK = 65536
RESULTS = Path(__file__).resolve().parent / "results"
EVICT_BYTES = 256 << 20
ONE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
DISK = "  shield_db, latents read from the shards at each search (resident budget 0)"
COARSE_DIM = PREFIX_WIDTHS[0]  # the first level's width: the previous release's coarse pass and the cells
VARIANTS = [(0, 0, False)] + [(dy, dx, f) for f in (False, True) for dy, dx in
                              ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (-1, -1), (0, 2))] + [(0, 0, True)]


def real_images() -> np.ndarray:
    """The 70,000 Fashion-MNIST images (train then test) as float32 in [0, 1], ``[n, 784]``."""
    parts = []
    for name in ("train", "t10k"):
        path = DATA / f"{name}-images-idx3-ubyte.gz"
        if not path.exists():
            raise SystemExit(f"{path} missing: apt-get install dataset-fashion-mnist")
        with gzip.open(path) as f:
            parts.append(np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, DIM))
    return np.concatenate(parts).astype(np.float32) / 255


def rows_of(images: np.ndarray, start: int, stop: int) -> np.ndarray:
    """fp16 rows ``start:stop`` of the (augmented) set: row ``i`` is image ``i % n``, variant ``i // n``."""
    n = len(images)
    idx = np.arange(start, stop)
    out = images[idx % n].reshape(-1, 28, 28).copy()
    variant = idx // n
    for v in np.unique(variant):
        if v == 0:
            continue
        dy, dx, flip = VARIANTS[v % len(VARIANTS)]
        pick = variant == v
        block = np.roll(out[pick], (dy, dx), axis=(1, 2))
        out[pick] = block[:, :, ::-1] if flip else block
        noise = np.random.default_rng(int(v) * 7919 + start).standard_normal(out[pick].shape).astype(np.float32)
        out[pick] += COPY_NOISE * noise
    return out.reshape(-1, *SHAPE).astype(np.float16)


def build(root: Path, images: np.ndarray, rows: int) -> tuple[ShieldDatabase, float]:
    db = ShieldDatabase(root / "db")
    record = root / "build.json"
    if db.exists() and record.exists():
        return db, json.loads(record.read_text())["build_s"]
    t0 = time.perf_counter()
    with db.writer(item_shape=SHAPE, rebuild=True) as txn:
        txn.commit_rows = CHUNK
        for start in range(0, rows, CHUNK):
            stop = min(rows, start + CHUNK)
            txn.add_batch([f"fmnist/{i:07d}" for i in range(start, stop)], [f"{i:064x}" for i in range(start, stop)],
                          rows_of(images, start, stop))
    build_s = time.perf_counter() - t0
    record.write_text(json.dumps({"build_s": build_s}))
    return db, build_s


def all_rows(snap) -> np.ndarray:
    return np.concatenate([snap.read_rows(np.arange(lo, min(snap.rows, lo + CHUNK))).reshape(-1, DIM)
                           for lo in range(0, snap.rows, CHUNK)])


def make_queries(x16: np.ndarray, rng) -> np.ndarray:
    pick = rng.choice(len(x16), 8, replace=False)
    return np.ascontiguousarray(x16[pick].astype(np.float32) + QUERY_NOISE * rng.standard_normal((8, DIM)).astype(np.float32))


def evict_caches(scratch: np.ndarray) -> None:
    """Stream a buffer larger than the L3 cache, so no method inherits the rows the previous one touched."""
    scratch.sum()


def truth(flat, x16: np.ndarray, q: np.ndarray, radius: float) -> set:
    _, _, rows = flat.range_search(q, (radius * 1.01) ** 2)
    rows = np.unique(rows)
    d = np.sqrt(((x16[rows].astype(np.float64)[None] - q.astype(np.float64)[:, None]) ** 2).sum(-1))
    return set(rows[(d <= radius).any(0)].tolist())


class FaissScreen(FeatureIndex):
    """The previous release's screen (FAISS range search on the same features), for the ablation row."""

    def candidates(self, queries, radius):
        feats, norms = features(queries, self.mu, self.a)
        max_feat_sq = (self.max_norm * (1 + FEATURE_REL_ERROR)) ** 2
        r2 = max(search_radius_sq(radius, float(n), self.max_norm, float((n * (1 + FEATURE_REL_ERROR)) ** 2),
                                  max_feat_sq, feats.shape[1]) for n in norms)
        _, _, ids = self.index.range_search(np.ascontiguousarray(feats), r2)
        return np.unique(ids).astype(np.int64)


class PreviousScreen(FeatureIndex):
    """The previous release's screen (two passes: 32 coarse numbers then the full features, each pass three
    array operations on ``[B, chunk]``, one radius for the whole batch), for the ablation row."""

    def candidates(self, queries, radius):
        feats, norms = features(queries, self.mu, self.a)
        r2 = float(self.screen_radii_sq(feats, norms, radius).max())
        cascade = self.cascade()
        if not hasattr(self, "_coarse"):
            self._coarse = prefix_features(cascade.full, COARSE_DIM)
            self._coarse_sq = squared_norms(self._coarse)
        rows = previous_pass(prefix_features(feats, COARSE_DIM), self._coarse, self._coarse_sq, r2)
        return rows[previous_pass(feats, cascade.full[rows], cascade.full_sq[rows], r2)].astype(np.int64)


def previous_pass(queries, rows, rows_sq, r2):
    q_sq = squared_norms(queries)[:, None]
    found = []
    for lo in range(0, len(rows), CHUNK):
        d2 = queries @ rows[lo:lo + CHUNK].T
        d2 *= -2
        d2 += rows_sq[lo:lo + CHUNK]
        d2 += q_sq
        found.append(lo + np.flatnonzero((d2 <= np.float32(r2)).any(0)))
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def screen_mb(index: FeatureIndex) -> float:
    """RAM of the stored features and the screen's arrays, MB."""
    cascade = index.cascade()
    arrays = [cascade.full, cascade.full_sq, cascade.first, *cascade.tails.values(), *cascade.level_sq.values()]
    extra = getattr(index, "_coarse", None)
    return (sum(a.nbytes for a in arrays) + (0 if extra is None else extra.nbytes * 35 // 34)) / 1e6


def upgrade(db: ShieldDatabase) -> float | None:
    """Refit a database an older release indexed with another basis size (an empty write does it); seconds, or None
    if current or if its basis size was chosen (``shield_db reindex``: measured as chosen)."""
    body = db.snapshot(check_sha=False, load_index=False).body
    if body["index"]["dim"] == DEFAULT_INDEX_DIM or INDEX_DIM_KEY in body:
        return None
    t0 = time.perf_counter()
    with db.writer():
        pass
    return time.perf_counter() - t0


def index_of_dim(x16: np.ndarray, k: int, cls=FeatureIndex) -> FeatureIndex:
    sample = np.sort(np.random.default_rng(0).choice(len(x16), min(len(x16), 8192), replace=False))
    mu, a = fit_basis(x16[sample], k)
    index = cls.empty(mu, a)
    for lo in range(0, len(x16), CHUNK):
        index.add(x16[lo:lo + CHUNK])
    return index


def diagnose(x16: np.ndarray, radius: float, rng) -> list[str]:
    """Why the screen passes what it passes: energy captured, residual spread, candidates; cell pruning."""
    q = np.concatenate([make_queries(x16, rng) for _ in range(8)])
    lines = ["| k | energy captured | residual n: mean / std | candidates / query (median, mean) | union / batch of 8 |",
             "|---|---|---|---|---|"]
    for k in (64, 128, 256):
        index = index_of_dim(x16, k)
        full = index.cascade().full
        fq, _ = features(q, index.mu, index.a)
        energy = float(np.square(full[:, :-1], dtype=np.float64).sum() / np.square(full, dtype=np.float64).sum())
        per_query = [len(index.candidates(q[b:b + 1], radius)) for b in range(len(q))]
        union = [len(index.candidates(q[b:b + 8], radius)) for b in range(0, len(q), 8)]
        lines.append(f"| {k} | {energy:.3f} | {full[:, -1].mean():.2f} / {full[:, -1].std():.2f} | "
                     f"{np.median(per_query):.0f}, {np.mean(per_query):.0f} | {np.median(union):.0f} |")
        if k == 64:
            lines_cells = cells(full, fq, radius)
    return lines + [""] + lines_cells


def cells(full: np.ndarray, fq: np.ndarray, radius: float) -> list[str]:
    """Rows exact cell pruning keeps, k-means cells on the features: a cell is skipped when the query ball misses
    its stored radius (``||f(q) - c|| > R_c + r``, "ball") or, sharper, when it lies beyond the bisector between the
    cell's centre and one of the query's 16 nearest centres by more than ``r`` ("Voronoi": every row of cell ``c``
    is closer to ``c`` than to ``c'``, so ``d(q, z) >= (||q - c||^2 - ||q - c'||^2) / (2 ||c - c'||)``); a row
    inside a kept ball cell is skipped when ``| ||f(q) - c|| - ||f(z) - c|| | > r`` ("annulus"). A batch scans
    the union of its 8 queries' cells (``fq`` holds whole batches of 8)."""
    out = ["| cells (k-means) | cells touched / query (ball) | rows in touched cells (ball) | rows passing the annulus "
           "test | cells kept / query (Voronoi) | rows in kept cells (Voronoi) | rows in the cells of a batch of 8 "
           "(Voronoi, union) |", "|---|---|---|---|---|---|---|"]
    n = len(full)
    for c in (256, 1024, 4096):
        if n < 39 * c:  # too few rows to train that many cells
            continue
        km = faiss.Kmeans(full.shape[1], c, niter=10, seed=1)
        km.train(full[np.random.default_rng(1).choice(n, min(n, 40 * c), replace=False)])
        _, label = km.index.search(full, 1)
        label = label[:, 0]
        dzc = np.linalg.norm(full - km.centroids[label], axis=1)
        cell_r = np.zeros(c)
        np.maximum.at(cell_r, label, dzc)
        size = np.bincount(label, minlength=c)
        centres = km.centroids.astype(np.float64)
        dqc = np.sqrt(((fq[:, None, :].astype(np.float64) - centres[None]) ** 2).sum(-1))
        touched = dqc <= cell_r[None] + radius
        kept = touched & np.array([voronoi_bound(d, centres) <= radius for d in dqc])
        in_cells = [size[t].sum() for t in touched]
        annulus = [int(((np.abs(dqc[b, label] - dzc) <= radius) & touched[b, label]).sum()) for b in range(len(fq))]
        union = [size[kept[b:b + 8].any(0)].sum() for b in range(0, len(fq), 8)]
        out.append(f"| {c} | {np.median(touched.sum(1)):.0f} of {c} | {np.median(in_cells) / n:.1%} | "
                   f"{np.median(annulus) / n:.1%} | {np.median(kept.sum(1)):.0f} | "
                   f"{np.median([size[k].sum() for k in kept]) / n:.1%} | {np.median(union) / n:.1%} |")
    return out


def voronoi_bound(dq: np.ndarray, centres: np.ndarray, near: int = 16) -> np.ndarray:
    """``[C]`` lower bounds of the distance from a query (``dq``: its distances to the centres) to any point of each
    Voronoi cell: the largest bisector distance to one of its ``near`` nearest centres (0 for those)."""
    idx = np.argsort(dq)[:near]
    gap = np.sqrt(((centres[:, None, :] - centres[idx][None]) ** 2).sum(-1))
    bound = (dq[:, None] ** 2 - dq[idx][None] ** 2) / (2 * np.maximum(gap, 1e-300))
    bound[idx, np.arange(len(idx))] = 0.0
    return np.maximum(bound.max(1), 0.0)


def cells_of_database(index, x16: np.ndarray, radius: float) -> list[str]:
    """Exact cell pruning measured on the database's own features: all ``k + 1`` and the coarse ``33``."""
    rng = np.random.default_rng(13)
    q = np.concatenate([make_queries(x16, rng) for _ in range(4)])
    fq, _ = features(q, index.mu, index.a)
    full = index.cascade().full
    coarse = prefix_features(full, COARSE_DIM)
    out = []
    for name, rows, fq_rows in ((f"all {full.shape[1]} features", full, fq),
                                (f"coarse {COARSE_DIM + 1} features", coarse, prefix_features(fq, COARSE_DIM))):
        if rows is not None:
            out += [f"Cells on {name}:", ""] + cells(rows, fq_rows, radius) + [""]
    return out


def breakdown(snap, disk, variants: dict, x16: np.ndarray, radius: float, ivf, reps: int) -> list[str]:
    """Where a batch's time goes (median ms per batch of 8 over ``reps`` batches, one thread), next to the floors of
    each stage on this machine: the first pass's matrix product alone (no comparison), the same product as int8
    (``torch._int_mm``, 32 columns), a gather of as many random rows of the full features as the first pass keeps,
    the queries' features by a few numpy calls, the candidates' check in float32 with no bound (not exact: what the
    arithmetic alone costs), and IVF nprobe 10 on the same batches. "Later levels" is the whole screen's time less its first pass's (timed just
    before it on the same batch). "Candidates read" gathers them from the latents held in RAM; "from the shards" reads
the same rows with one ``preadv`` each (the snapshot ``disk`` holds nothing), after the caches are flushed again."""
    rng, scratch = np.random.default_rng(17), np.ones(EVICT_BYTES // 8)
    lines = ["| stage (ms per batch of 8) | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    rows = {}
    for name, index in variants.items():
        cascade = index.cascade()
        first = cascade.widths[0] if cascade.widths else cascade.full.shape[1] - 1
        n = len(cascade.first)
        int8_rows, int8_q = torch.zeros((n, 32), dtype=torch.int8), torch.ones((32, 8), dtype=torch.int8)
        t = {k: [] for k in ("query features", "first pass (folded product, compare, keep)", "later levels "
                             "(gathers and passes)", "candidates read", "exact check", "candidates read from the shards", "floor: first pass product "
                             "alone", "floor: same product in int8 (torch._int_mm)", "floor: gather of the first "
                             "pass's survivors", "floor: query features in numpy (no torch calls)",
                             "floor: exact check in float32 alone (no bound, no float64)", "IVF nprobe 10",
                             "first-pass survivors", "candidates")}
        for _ in range(reps):
            q = make_queries(x16, rng)
            evict_caches(scratch)
            t0 = time.perf_counter()
            feats, norms = features(q, index.mu, index.a)
            r2 = index.screen_radii_sq(feats, norms, radius)
            t1 = time.perf_counter()
            folded = fold_queries(prefix_features(feats, first) if cascade.widths else feats, r2)
            kept = folded_pass(*folded, cascade.first)
            t2 = time.perf_counter()
            cand = cascade.candidates(feats, r2)
            t3 = time.perf_counter()
            z = snap.read_rows(cand)
            t4 = time.perf_counter()
            within_any(torch.from_numpy(q), z, radius)
            t5 = time.perf_counter()
            t["query features"].append(t1 - t0)
            t["first pass (folded product, compare, keep)"].append(t2 - t1)
            t["later levels (gathers and passes)"].append(max(0.0, (t3 - t2) - (t2 - t1)))
            t["candidates read"].append(t4 - t3)
            t["exact check"].append(t5 - t4)
            evict_caches(scratch)
            t0 = time.perf_counter()
            disk.read_rows(cand)
            t["candidates read from the shards"].append(time.perf_counter() - t0)
            t["first-pass survivors"].append(len(kept) * 1e-3)
            t["candidates"].append(len(cand) * 1e-3)
            evict_caches(scratch)
            t0 = time.perf_counter()
            for lo in range(0, n, CHUNK_ROWS):
                np.matmul(cascade.first[lo:lo + CHUNK_ROWS], folded[0])
            t["floor: first pass product alone"].append(time.perf_counter() - t0)
            evict_caches(scratch)
            t0 = time.perf_counter()
            for lo in range(0, n, CHUNK_ROWS):
                torch._int_mm(int8_rows[lo:lo + CHUNK_ROWS], int8_q)
            t["floor: same product in int8 (torch._int_mm)"].append(time.perf_counter() - t0)
            evict_caches(scratch)
            t0 = time.perf_counter()
            np.take(cascade.full, np.sort(rng.choice(n, len(kept), replace=False)), axis=0)
            t["floor: gather of the first pass's survivors"].append(time.perf_counter() - t0)
            evict_caches(scratch)
            ivf.nprobe = 10
            t0 = time.perf_counter()
            ivf.range_search(q, radius * radius)
            t["IVF nprobe 10"].append(time.perf_counter() - t0)
            evict_caches(scratch)
            t0 = time.perf_counter()
            numpy_features(q, index.mu, index.a)
            t["floor: query features in numpy (no torch calls)"].append(time.perf_counter() - t0)
            evict_caches(scratch)
            t0 = time.perf_counter()
            unbounded_check(q, z, radius)
            t["floor: exact check in float32 alone (no bound, no float64)"].append(time.perf_counter() - t0)
        rows[name] = {k: float(np.median(v)) * 1e3 for k, v in t.items()}
    stages = [k for k in next(iter(rows.values())) if k not in ("first-pass survivors", "candidates")]
    for k in stages:
        lines.append(f"| {k} | " + " | ".join(f"{rows[m][k]:.1f}" for m in variants) + " |")
    lines.append("| sum of the pipeline's stages | " + " | ".join(
        f"{sum(rows[m][k] for k in stages[:5]):.1f}" for m in variants) + " |")
    for k in ("first-pass survivors", "candidates"):
        lines.append(f"| {k} (median) | " + " | ".join(f"{rows[m][k]:.0f}" for m in variants) + " |")
    return lines


def numpy_features(x: np.ndarray, mu: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The queries' features computed with a handful of numpy calls (a floor for the per-call cost of
    ``projection.features``, which runs the same float64 arithmetic through torch)."""
    xc = x.astype(np.float64) - mu
    proj = xc @ a
    norm_sq = np.einsum("ij,ij->i", xc, xc)
    residual = np.sqrt(np.maximum(norm_sq - np.einsum("ij,ij->i", proj, proj), 0.0))
    return np.concatenate([proj, residual[:, None]], 1).astype(np.float32)


def unbounded_check(q: np.ndarray, z: np.ndarray, radius: float) -> np.ndarray:
    """The candidates' distances in float32 with no rounding bound and no float64 re-check (NOT exact: a floor
    for what ``exact.within_any`` costs beyond the arithmetic it cannot avoid)."""
    zc = torch.from_numpy(z.reshape(len(z), -1)).float()
    qt = torch.from_numpy(q)
    centre = qt.mean(0)
    qc = qt - centre
    zc.sub_(centre)
    d2 = torch.addmm(zc.square().sum(1)[None, :] + qc.square().sum(1)[:, None], qc, zc.T, alpha=-2)
    return (d2 <= radius * radius).any(0).numpy()


def require_one_thread() -> None:
    """Stop unless the BLAS and OpenMP pools were limited to one thread before numpy, torch and FAISS loaded:
    their idle workers spin beside each other on 2 cores and make single stages 5-25x slower."""
    unset = [name for name in ONE_THREAD_ENV if os.environ.get(name) != "1"]
    if unset:
        raise SystemExit(f"run as: {' '.join(f'{n}=1' for n in ONE_THREAD_ENV)} python -m benchmarks.shield_db_real "
                         f"... ({', '.join(unset)} not 1: the timings would measure spinning thread pools)")


def main():
    require_one_thread()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--dims", type=int, nargs="*", default=[], help="extra basis sizes (ablation rows; "
                        "128, the previous release, is always measured)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 10], help="IVF probe counts to measure "
                        "(add larger ones to find the nprobe where IVF stops missing on these batches)")
    parser.add_argument("--repeats", type=int, default=1, help="time each method this many times per batch (caches "
                        "flushed before each) and keep the least: sporadic stalls of the machine drop out")
    parser.add_argument("--suffix", default="", help="appended to the result files' names (keeps other runs' files)")
    parser.add_argument("--diagnose", action="store_true")
    parser.add_argument("--cells", action="store_true", help="only measure exact k-means cell pruning on the "
                                                             "database's own features, then stop")
    parser.add_argument("--breakdown", action="store_true", help="only measure where a batch's time goes and the "
                        "floors of each stage (with --dims: those basis sizes too), then stop")
    args = parser.parse_args()
    root = Path(os.environ.get("SHIELD_DB_BENCH", "/tmp/shield_db_bench")) / f"real-{args.rows}"
    root.mkdir(parents=True, exist_ok=True)
    images = real_images()
    if args.rows <= 60000:
        images = images[:60000]
    db, build_s = build(root, images, args.rows)
    load_start = os.getloadavg()[0]
    upgrade_s = upgrade(db)
    source = DatabaseShields(db.snapshot(check_sha=False))
    snap = source.snapshot
    snap.wait_held()
    held_mb = sum(s.latent_reader.array.nbytes for s in snap.shards if isinstance(s.latent_reader, ResidentRows)) / 1e6
    x16 = all_rows(snap)
    if args.cells:
        rng = np.random.default_rng(7)  # the same probe queries, hence the same radius, as the timed run
        probe = np.concatenate([make_queries(x16, rng) for _ in range(8)])
        dist, _ = faiss.knn(probe, x16.astype(np.float32), 6)
        radius = float(np.median(np.sqrt(dist[:, 5])))
        lines = [f"{len(x16)} rows, radius {radius:.3f}, 32 queries", ""] + cells_of_database(snap.index, x16, radius)
        print("\n".join(lines))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"shield_db_real_{args.rows}_cells.md").write_text("\n".join(lines) + "\n")
        return
    t0 = time.perf_counter()
    flat = faiss.IndexFlatL2(DIM)
    for lo in range(0, len(x16), CHUNK):
        flat.add(x16[lo:lo + CHUNK].astype(np.float32))
    flat_build = time.perf_counter() - t0
    rng = np.random.default_rng(7)
    probe = np.concatenate([make_queries(x16, rng) for _ in range(8)])
    dist, _ = flat.search(probe, 6)
    radius = float(np.median(np.sqrt(dist[:, 5])))
    nlist = int(round(len(x16) ** 0.5))
    t0 = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(DIM), DIM, nlist)
    ivf.cp.niter = 10
    ivf.train(x16[np.random.default_rng(1).choice(len(x16), min(len(x16), 40 * nlist), replace=False)].astype(np.float32))
    for lo in range(0, len(x16), CHUNK):
        ivf.add(x16[lo:lo + CHUNK].astype(np.float32))
    ivf_build = time.perf_counter() - t0
    own = snap.index
    if args.breakdown:
        chosen = {f"k={own.a.shape[1]}, as built": own, **{f"k={k}": index_of_dim(x16, k) for k in args.dims}}
        for index in chosen.values():
            index.candidates(probe[:8], radius)  # the screen's arrays are built on first search
        lines = breakdown(snap, DatabaseShields(db.snapshot(check_sha=False), resident_bytes=0).snapshot, chosen, x16, radius, ivf, args.reps)
        head = (f"{len(x16)} rows, radius {radius:.3f}, {args.reps} batches of 8, one thread, load average "
                f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
        print(head + "\n\n" + "\n".join(lines))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"shield_db_real_{args.rows}_breakdown{args.suffix}.md").write_text(head + "\n\n" + "\n".join(lines) + "\n")
        return
    variants = {f"shield_db (k={own.a.shape[1]}, cascade {'/'.join(map(str, own.widths))}/full)": own}
    builds = {name: build_s for name in variants}
    for k in [128] + [k for k in args.dims if k != 128]:
        t0 = time.perf_counter()
        v = index_of_dim(x16, k)
        builds[f"  k={k}"] = time.perf_counter() - t0
        if k == 128:  # the previous release: 128 directions, its two-pass screen
            variants["  previous release (k=128, two-pass screen)"] = PreviousScreen(v.mu, v.a, v.index, v.max_norm)
            builds["  previous release (k=128, two-pass screen)"] = builds[f"  k={k}"]
        if k != own.a.shape[1]:
            variants[f"  k={k}, cascade {'/'.join(map(str, v.widths))}/full"] = v
            builds[f"  k={k}, cascade {'/'.join(map(str, v.widths))}/full"] = builds[f"  k={k}"]
        if k == 64:  # the release before: 64 directions, FAISS range search
            variants["  k=64, faiss screen (release before)"] = FaissScreen(v.mu, v.a, v.index, v.max_norm)
            builds["  k=64, faiss screen (release before)"] = builds[f"  k={k}"]
    arrays_s = {}
    for name, v in variants.items():  # the screen's arrays are built when an opened set is first searched
        t0 = time.perf_counter()
        v.candidates(probe[:8], radius)
        arrays_s[name] = time.perf_counter() - t0
    disk = DatabaseShields(db.snapshot(check_sha=False), resident_bytes=0)
    disk.snapshot.index = own
    ivfs = [f"ivf{n}" for n in args.nprobe]
    methods = list(variants) + [DISK, "flat"] + ivfs
    stats = {m: {"t": [], "cpu": [], "found": 0, "extra": 0, "cand": []} for m in methods}
    n_true = 0

    def run_method(m: str, q: np.ndarray):
        """``(rows found, wall s, CPU s)`` of one method on one batch."""
        if m in variants:
            snap.index = variants[m]
            call = lambda: source.within_rows(torch.from_numpy(q), radius)  # noqa: E731
        elif m == DISK:
            call = lambda: disk.within_rows(torch.from_numpy(q), radius)  # noqa: E731
        elif m == "flat":
            call = lambda: flat.range_search(q, radius * radius)[2]  # noqa: E731
        else:
            ivf.nprobe = int(m[3:])
            call = lambda: ivf.range_search(q, radius * radius)[2]  # noqa: E731
        c0, t0 = time.process_time(), time.perf_counter()
        found = call()
        return found, time.perf_counter() - t0, time.process_time() - c0

    order_rng = np.random.default_rng(5)
    scratch = np.ones(EVICT_BYTES // 8)
    for rep in range(args.reps):
        q = make_queries(x16, rng)
        ref = truth(flat, x16, q, radius)
        n_true += len(ref)
        best = {}
        for _ in range(args.repeats):  # each method's time on this batch: the least of its repeats
            for m in order_rng.permutation(methods).tolist():
                evict_caches(scratch)
                found, dt, cpu = run_method(m, q)
                old = best.get(m, (found, np.inf, np.inf))
                best[m] = (old[0], min(old[1], dt), min(old[2], cpu))
        for m, (found, dt, cpu) in best.items():
            found = set(np.asarray(found).tolist())
            stats[m]["t"].append(dt)
            stats[m]["cpu"].append(cpu)
            stats[m]["found"] += len(found & ref)
            stats[m]["extra"] += len(found - ref)
            if m in variants or m == DISK:
                stats[m]["cand"].append(len(variants.get(m, own).candidates(q, radius)))
        print(f"rep {rep}: {len(ref)} true hits; " + ", ".join(f"{m.strip()} {1e3 * stats[m]['t'][-1]:.1f}ms" for m in methods),
              flush=True)
    snap.index = own
    med = {m: float(np.median(stats[m]["t"])) for m in methods}
    cpu = {m: float(np.median(stats[m]["cpu"])) for m in methods}
    names = {"flat": "flat (`IndexFlatL2`)"}
    names.update({m: f"IVF nprobe {m[3:]}" + (f" (nlist {nlist})" if i == 0 else "") for i, m in enumerate(ivfs)})
    lines = ["| method | recall | missed | ms / batch of 8 (median) | x flat | CPU ms / batch | x flat (CPU) | "
             "candidates / batch | RAM MB (screen + latents held) | build s |", "|---|---|---|---|---|---|---|---|---|---|"]
    memory = {m: screen_mb(v) + held_mb for m, v in variants.items()}
    memory[DISK] = screen_mb(own)
    memory.update({"flat": flat.ntotal * DIM * 4 / 1e6, ivfs[0]: ivf.ntotal * DIM * 4 / 1e6})
    for m in methods:
        build_time = builds.get(m, build_s if m == DISK else flat_build if m == "flat" else ivf_build)
        cand = f"{np.median(stats[m]['cand']):.0f}" if stats[m]["cand"] else ""
        mem = f"{memory[m]:.0f}" if m in memory else ""
        lines.append(f"| {names.get(m, m)} | {stats[m]['found'] / max(1, n_true):.3f} | {n_true - stats[m]['found']} | "
                     f"{1e3 * med[m]:.1f} | {med['flat'] / med[m]:.1f} | {1e3 * cpu[m]:.1f} | {cpu['flat'] / cpu[m]:.1f} | "
                     f"{cand} | {mem} | {build_time:.1f} |")
    table = "\n".join(lines)
    header = (f"{len(x16)} rows x {DIM} dims, radius {radius:.3f}, {args.reps} batches of 8 (each method timed {args.repeats}x per batch, the least kept), {n_true} true hits, "
              f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; screen arrays built "
              f"on first search: " + ", ".join(f"{m.strip()} {t:.2f} s" for m, t in arrays_s.items())
              + ("" if upgrade_s is None else f"; the database's index upgraded to k={DEFAULT_INDEX_DIM} by an empty "
                                              f"write in {upgrade_s:.1f} s"))
    print(header)
    print(table)
    out = [header, "", table]
    if args.diagnose:
        diag = diagnose(x16, radius, np.random.default_rng(11))
        print("\n".join(diag))
        out += ["", *diag]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"shield_db_real_{args.rows}{args.suffix}.md").write_text("\n".join(out) + "\n")
    (RESULTS / f"shield_db_real_{args.rows}{args.suffix}.json").write_text(json.dumps(
        {"rows": len(x16), "radius": radius, "true_hits": n_true, "median_s": med,
         "per_batch_s": {m: stats[m]["t"] for m in methods}, "cpu_median_s": cpu,
         "per_batch_cpu_s": {m: stats[m]["cpu"] for m in methods}, "found": {m: stats[m]["found"] for m in methods},
         "extra": {m: stats[m]["extra"] for m in methods}, "candidates": {m: stats[m]["cand"] for m in methods},
         "build_s": {**builds, "flat": flat_build, "ivf": ivf_build}, "upgrade_s": upgrade_s,
         "screen_arrays_s": arrays_s, "screen_mb": memory, "load_average": [load_start, os.getloadavg()[0]]},
        indent=1))


if __name__ == "__main__":
    main()
