"""Build and open a shield database of a folder of >= 100k small images under a soft limit of 1024 open files.

    python -m benchmarks.shield_db_fds [--images 100000] [--nofile 1024]

Issue 13, item 5: ~87k images used to exhaust 1024 descriptors (3 per shard per snapshot, merges only at the
end). The folder (8x8 PNGs, made once under $SHIELD_DB_BENCH, default /tmp/shield_db_bench/fds) is encoded by a
stand-in encoder (4x4 average pooling, no VAE) through ``sync_folder``, as the Shield Set Loader does, with
RLIMIT_NOFILE lowered to ``--nofile`` before anything is opened. A thread samples ``/proc/self/fd`` every 10 ms
(Linux) for the peak. Prints wall times, shard count and peak descriptors as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from shield_db.database import ShieldDatabase
from shield_db.folder import sync_folder
from shield_db.source import DatabaseShields

ROOT = Path(os.environ.get("SHIELD_DB_BENCH", "/tmp/shield_db_bench")) / "fds"


def pooled(pixels: np.ndarray) -> np.ndarray:
    x = pixels.astype(np.float32) / 255.0
    p = x.reshape(len(x), 2, 4, 2, 4, 3).mean((2, 4)).transpose(0, 3, 1, 2)
    return np.concatenate([p, p.mean(1, keepdims=True)], 1)


def make_folder(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    have = len(os.listdir(folder))
    rng = np.random.default_rng(have)
    for i in range(have, count):
        sub = folder / f"{i // 10000:03d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(sub / f"{i:07d}.png")


class PeakFds(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, len(os.listdir("/proc/self/fd")))
            time.sleep(0.01)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--nofile", type=int, default=1024)
    args = p.parse_args()
    folder = ROOT / f"images-{args.images}"
    marker = folder / ".complete"
    t = time.perf_counter()
    if not marker.exists():
        make_folder(folder, args.images)
        marker.write_text("ok")
    made = time.perf_counter() - t
    db = ROOT / f"db-{args.images}"
    if db.exists():
        import shutil
        shutil.rmtree(db)
    resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    sampler = PeakFds()
    sampler.start()
    t = time.perf_counter()
    result = sync_folder(folder, pooled, (4, 2, 2), 8, 8, "stretch", "stand-in", batch_size=256, database=db)
    built = time.perf_counter() - t
    t = time.perf_counter()
    snapshots = [ShieldDatabase(db).snapshot() for _ in range(4)]  # a host may hold a few sets at once
    src = DatabaseShields(snapshots[-1])
    hits = src.within_rows(src.latents([0, 1]), 0.05)
    opened = time.perf_counter() - t
    sampler.running = False
    sampler.join()
    print(json.dumps({"images": args.images, "encoded": result.encoded, "shields": len(src), "nofile": args.nofile,
                      "shards": len(snapshots[-1].shards), "peak_fds": sampler.peak, "make_folder_s": round(made, 1),
                      "build_s": round(built, 1), "open_4_snapshots_and_search_s": round(opened, 2),
                      "hits": int(len(hits))}, indent=1))


if __name__ == "__main__":
    main()
