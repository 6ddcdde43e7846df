"""Per-evaluation cost of screening shields on the sampling device (issue #18 item 2), CPU torch here.

    nice -n 10 python -m benchmarks.shield_screen_device [--parts abc] [--rows 65536]     (from the repository root)

Part A: synthetic shields x 4096 dims (4x32x32; 64k by default: float64 features of 1M rows take too long
on this shared machine), 7 batches of 8 queries: the device path (features resident on
the query device, one torch matmul per batch, guidance.feature_screen) against the FAISS path (shield_db's
FeatureIndex.candidates, IndexFlatL2 range search), both on the same stored features, both followed by the same
exact verification of the candidates (their fp16 latents held in RAM: a warm page cache). Recall and precision
against float64 brute force. Part B: the screen alone over 1M and 10M synthetic 65-number features, and the
exact check of 4000 fp16 candidates (the count shield_db's 1M benchmark passes per batch). Part C: the in-memory
case (10k shields of 4x64x64, batch 8, intra-batch on, no hits), TensorShields before (git BASE) and after.
The model evaluation these costs are compared with (ComfyUI's own UNetModel in the SD1.5 shape on this CPU) is
measured inside ComfyUI by ``benchmarks/spell_cost_comfyui.py`` (BENCHMARKS.md, "SPELL cost inside ComfyUI").
The 1M x 4096 side by side with real features (device path, shield_db, FAISS, PostgreSQL) is
``benchmarks/shield_db_side_by_side.py``.
"""
import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from guidance.feature_screen import FeatureScreen, map_features, within_mask
from guidance.shields import TensorShields
from guidance.spell import sparse_repellency
from shield_db.feature_index import FeatureIndex
from shield_db.projection import FIT_SAMPLE_ROWS, feature_error, features, fit_basis

ROOT = Path(__file__).resolve().parents[1]

ITEM = (4, 32, 32)
DIM = math.prod(ITEM)
CHUNK = 65536
CLUSTERS = 1000
RADIUS = 10.0
BASE = "36a60aa"          # the commit before this work: TensorShields without the feature screen
RESULTS = ROOT / "benchmarks" / "results"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def chunk_latents(start: int, rows: int, seed: int = 0) -> torch.Tensor:
    """Rows ``start:start+rows`` (``start`` a multiple of CHUNK) of the synthetic set, fp16, deterministic.

    1000 cluster centres, a 16-direction within-cluster variation (0.3 per element) and white detail; rows come
    in near-duplicate groups of 4 sharing centre and variation (white detail differs, 0.1 per element).
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLUSTERS, DIM, generator=g)
    basis = torch.randn(16, DIM, generator=g) * 0.3
    g.manual_seed(seed + 1 + start // CHUNK)
    groups = (rows + 3) // 4
    cluster = torch.randint(0, CLUSTERS, (groups,), generator=g)
    shared = centres[cluster] + torch.randn(groups, 16, generator=g) @ basis
    x = shared.repeat_interleave(4, 0)[:rows] + 0.1 * torch.randn(rows, DIM, generator=g)
    return x.half()


def build_features(rows: int, query_rows: np.ndarray):
    """FeatureIndex over every row (float64 features, as shield_db builds them) and the query rows' latents."""
    sample = chunk_latents(0, min(CHUNK, rows))[torch.linspace(0, min(CHUNK, rows) - 1, FIT_SAMPLE_ROWS).long()]
    mu, a = fit_basis(sample.float().numpy(), 64)
    index = FeatureIndex.empty(mu, a)
    picked = {}
    for start in range(0, rows, CHUNK):
        x = chunk_latents(start, min(CHUNK, rows - start))
        index.add(x.numpy())
        for r in query_rows[(query_rows >= start) & (query_rows < start + len(x))]:
            picked[int(r)] = x[r - start].clone()
        print(f"  features {start + len(x)} / {rows}", flush=True)
    return index, picked


def make_queries(picked: dict, rows: np.ndarray, seed: int) -> torch.Tensor:
    """Stored rows moved by a random direction of length 0.9 r: each ball holds its row and some duplicates."""
    g = torch.Generator().manual_seed(seed)
    z = torch.stack([picked[int(r)] for r in rows]).float()
    p = torch.randn(len(rows), DIM, generator=g)
    return z + p / p.norm(dim=1, keepdim=True) * 0.9 * RADIUS


def device_candidates(index: FeatureIndex, screen: FeatureScreen, q: np.ndarray) -> np.ndarray:
    """The device path of shield_db.source.DatabaseShields: query features, then one matmul screen."""
    f, n = features(q, index.mu, index.a)
    return screen.candidates(torch.from_numpy(f), torch.from_numpy(n), RADIUS).numpy()


def collect(rows: int, batches: list, cand_union: set):
    """Second pass: latents of every candidate row, and float64 truth (a wide float32 pass, then exact)."""
    kept, truth = {}, [set() for _ in batches]
    for start in range(0, rows, CHUNK):
        x = chunk_latents(start, min(CHUNK, rows - start))
        xf = x.float()
        x_sq = xf.square().sum(1)
        for i, q in enumerate(batches):
            approx = q.square().sum(1)[:, None] + x_sq[None, :] - 2 * q @ xf.T
            near = ((approx <= (RADIUS + 5) ** 2).any(0)).nonzero().flatten()
            if len(near):
                d = torch.cdist(q.double(), xf[near].double())
                truth[i] |= {int(start + r) for r in near[(d <= RADIUS).any(0)]}
        for r in [r for r in cand_union if start <= r < start + len(x)]:
            kept[r] = x[r - start]
        print(f"  truth {start + len(x)} / {rows}", flush=True)
    return kept, truth


def verify(q: torch.Tensor, cand: np.ndarray, kept: dict) -> set:
    if len(cand) == 0:
        return set()
    z = torch.stack([kept[int(r)] for r in cand])
    return set(cand[within_mask(q, z, RADIUS).numpy()].tolist())


def part_a(rows: int, reps: int, record: dict):
    rng = np.random.default_rng(5)
    query_rows = np.sort(rng.choice(rows, size=8 * reps, replace=False))
    t0 = time.perf_counter()
    index, picked = build_features(rows, query_rows)
    record["features_build_s"] = time.perf_counter() - t0
    perm = rng.permutation(query_rows)
    batches = [make_queries(picked, perm[8 * i:8 * i + 8], i) for i in range(reps)]
    stored = faiss.rev_swig_ptr(index.index.get_xb(), index.rows * index.index.d).reshape(index.rows, -1)
    before = rss_mb()
    screen = FeatureScreen(torch.from_numpy(stored), index.max_norm, feature_error(1.0))
    record["device_screen_extra_mb"] = rss_mb() - before
    record["features_mb"] = stored.nbytes / 2 ** 20
    cands = {"device": [], "faiss": []}
    for q in batches:
        cands["device"].append(device_candidates(index, screen, q.numpy()))
        cands["faiss"].append(index.candidates(q.numpy(), RADIUS))
    union = set().union(*[set(c.tolist()) for c in cands["device"] + cands["faiss"]])
    kept, truth = collect(rows, batches, union)
    times = {k: [] for k in ("device_screen", "faiss_screen", "verify")}
    found = {"device": 0, "faiss": 0, "true": 0, "extra": 0}
    for i, q in enumerate(batches):
        order = ["device", "faiss"] if i % 2 == 0 else ["faiss", "device"]
        for path in order:
            t = time.perf_counter()
            c = device_candidates(index, screen, q.numpy()) if path == "device" else index.candidates(q.numpy(), RADIUS)
            times[f"{path}_screen"].append(time.perf_counter() - t)
            t = time.perf_counter()
            hits = verify(q, c, kept)
            if path == "device":
                times["verify"].append(time.perf_counter() - t)
            found[path] += len(hits & truth[i])
            found["extra"] += len(hits - truth[i])
        found["true"] += len(truth[i])
    record["part_a"] = {
        "rows": rows, "batches": reps, "true_hits": found["true"], "extra_reported": found["extra"],
        "recall_device": found["device"] / max(1, found["true"]), "recall_faiss": found["faiss"] / max(1, found["true"]),
        "candidates_device": [len(c) for c in cands["device"]], "candidates_faiss": [len(c) for c in cands["faiss"]],
        "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
        "all_ms": {k: [round(1000 * x, 1) for x in v] for k, v in times.items()}}
    print(json.dumps(record["part_a"]), flush=True)


def part_b(sizes: list, record: dict, verify_rows: int = 4000):
    """The screen alone over synthetic clustered features (1M, 10M): FeatureScreen vs IndexFlatL2 range search;
    plus the exact check of ``verify_rows`` fp16 candidates of 4096 dims (the same for both paths)."""
    out = {}
    for rows in sizes:
        g = torch.Generator().manual_seed(9)
        centres = torch.randn(10000, 65, generator=g) * 30
        index = faiss.IndexFlatL2(65)
        for start in range(0, rows, 1 << 20):
            n = min(1 << 20, rows - start)
            f = centres[torch.randint(0, 10000, (n,), generator=g)] + torch.empty(n, 65).uniform_(-5, 5, generator=g)
            index.add(f.numpy())
            del f
        stored = faiss.rev_swig_ptr(index.get_xb(), rows * 65).reshape(rows, 65)
        before = rss_mb()
        screen = FeatureScreen(torch.from_numpy(stored), 0.0, 0.0)
        extra = rss_mb() - before
        times = {"device": [], "faiss": []}
        cpu = {"device": [], "faiss": []}
        counts = {"device": [], "faiss": []}
        zeros = torch.zeros(8, dtype=torch.float64)
        for rep in range(7):
            q = torch.from_numpy(stored[rep * 1000:rep * 1000 + 8].copy()) + torch.randn(8, 65, generator=g)
            for path in (["device", "faiss"] if rep % 2 == 0 else ["faiss", "device"]):
                t, t_cpu = time.perf_counter(), time.process_time()
                if path == "device":
                    c = screen.candidates(q, zeros, 6.0)
                else:
                    _, _, c = index.range_search(q.numpy(), np.float32(6.0 ** 2 * (1 + 1e-5)))
                    c = np.unique(c)
                times[path].append(time.perf_counter() - t)
                cpu[path].append(time.process_time() - t_cpu)
                counts[path].append(len(c))
        out[rows] = {"features_mb": stored.nbytes / 2 ** 20, "device_screen_extra_rss_mb": extra,
                     "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
                     "cpu_median_ms": {k: 1000 * statistics.median(v) for k, v in cpu.items()},
                     "all_ms": {k: [round(1000 * x, 1) for x in v] for k, v in times.items()}, "candidates": counts}
        print(json.dumps({rows: out[rows]}), flush=True)
        del screen, stored, index
    z = (torch.randn(verify_rows, DIM) * 2).half()
    q = z[:8].float() + 0.5
    times, cpu = [], []
    for _ in range(7):
        t, t_cpu = time.perf_counter(), time.process_time()
        within_mask(q, z, RADIUS)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - t_cpu)
    out["verify"] = {"rows": verify_rows, "dim": DIM, "median_ms": 1000 * statistics.median(times),
                     "cpu_median_ms": 1000 * statistics.median(cpu)}
    record["part_b"] = out
    print(json.dumps(out["verify"]), flush=True)


def old_tensor_shields():
    """TensorShields as of BASE (full float32 pass every evaluation), loaded from git."""
    code = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASE}:guidance/shields.py"], check=True,
                          capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="old_shields_"))
    (folder / "old_shields.py").write_text(code)
    spec = importlib.util.spec_from_file_location("old_shields", folder / "old_shields.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TensorShields


def part_c(record: dict, reps: int = 7):
    """10k in-memory shields of 4x64x64, batch 8, intra-batch on, no hits; two kinds of predictions:
    ``far`` = isotropic noise (spell_cost_comfyui.py's case), ``on_data`` = fresh samples of the shields'
    own distribution (other members of their clusters, none within 2r): what a model's predictions look like."""
    shape = (4, 64, 64)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(100, *shape, generator=g)
    z = (centres[torch.randint(0, 100, (10000,), generator=g)] + 0.5 * torch.randn(10000, *shape, generator=g))
    radius = 0.3 * math.sqrt(math.prod(shape))
    queries = {"far": torch.randn(8, *shape, generator=torch.Generator().manual_seed(1)) * 1.5,
               "on_data": centres[:8] + 0.5 * torch.randn(8, *shape, generator=torch.Generator().manual_seed(2))}
    out, sources = {}, {}
    for name, make in (("before", lambda: old_tensor_shields()(z.clone())),
                       ("after", lambda: TensorShields(z.half(), dtype=torch.float16)),
                       ("after_f32", lambda: TensorShields(z))):     # float32 latents, kept as float32
        before = rss_mb()
        t = time.perf_counter()
        sources[name] = make()
        if name.startswith("after"):
            sources[name].to(torch.device("cpu"))            # fits the map and computes the features
        out[name] = {"setup_s": time.perf_counter() - t, "rss_growth_mb": rss_mb() - before}
    for kind, x0 in queries.items():
        times = {name: [] for name in sources}
        cpu = {name: [] for name in sources}
        for rep in range(reps + 1):                            # interleaved; the first round is a warm-up
            for name in (list(sources) if rep % 2 == 0 else list(sources)[::-1]):
                t, c = time.perf_counter(), time.process_time()
                res = sparse_repellency(x0, radius, shields=sources[name], intra_batch=True)
                if rep:
                    times[name].append(time.perf_counter() - t)
                    cpu[name].append(time.process_time() - c)
                assert int(res.shields_hit.sum()) == 0
        for name in sources:
            out[name][kind] = {"median_ms": 1000 * statistics.median(times[name]),
                               "cpu_median_ms": 1000 * statistics.median(cpu[name]),
                               "all_ms": [round(1000 * v) for v in times[name]]}
        feats, norms = map_features(x0.float(), *sources["after"]._map_for(torch.device("cpu")))
        out["after"][kind]["candidates"] = len(sources["after"].screen(torch.device("cpu")).candidates(
            feats, norms, 2 * radius))
    screen = sources["after"].screen(torch.device("cpu"))
    out["after"]["device_bytes"] = screen.feats.nbytes + screen.sq.nbytes
    out["after"]["cpu_latent_bytes"] = sources["after"].shields.nbytes
    out["before"]["device_bytes"] = z.nbytes
    record["part_c"] = out
    print(json.dumps(out), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=65536, help="Part A: shields with real float64 features")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--screen-rows", default="1000000,10000000", help="Part B: synthetic feature counts")
    parser.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (0: their default)")
    parser.add_argument("--parts", default="abc", help="a: 64k real features, b: 1M/10M screens, c: in-memory 10k")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    record = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    if "c" in args.parts:
        part_c(record)
    if "a" in args.parts:
        part_a(args.rows, args.reps, record)
    if "b" in args.parts:
        part_b([int(v) for v in args.screen_rows.split(",")], record)
    record["load_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"shield_screen_device_{args.parts}{f'_t{args.threads}' if args.threads else ''}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
