"""Reloading an unchanged 10k-image folder: fingerprint + sync (no VAE call) + open the shield set.

Builds a folder of 10,000 small PNGs under $SHIELD_DB_BENCH (default /tmp/shield_db_bench)/reload once, encodes
it at 512x512 with a stand-in encoder (8x8 average pooling to 4x64x64, the SD latent size: the VAE is never
called on reload, so its speed does not matter here), then times what the Shield Set Loader does when the
folder is unchanged: IS_CHANGED's fingerprint (stat of every file), the sync (manifest, stat comparison), and
opening the database (checksums, FAISS index) into a shield source. "warm" is a reload in the same process
(ComfyUI re-running the node: shard checksums are remembered per file stat); "cold" is a fresh process.

    python -m benchmarks.shield_db_reload [--images 10000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from shield_db.database import ShieldDatabase
from shield_db.folder import fingerprint, sync_folder
from shield_db.source import DatabaseShields

ROOT = Path(os.environ.get("SHIELD_DB_BENCH", "/tmp/shield_db_bench")) / "reload"
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 512


def pool_encoder(pixels: np.ndarray) -> np.ndarray:
    x = pixels.astype(np.float32) / 255.0
    b = len(x)
    pooled = x.reshape(b, SIZE // 8, 8, SIZE // 8, 8, 3).mean((2, 4)).transpose(0, 3, 1, 2)
    return np.concatenate([pooled, pooled.mean(1, keepdims=True)], 1)


def never_called(pixels):
    raise AssertionError("the VAE was called on an unchanged folder")


def make_folder(n: int) -> Path:
    folder = ROOT / f"images_{n}"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"img_{i:05d}.png")
    return folder


def reload(folder: Path) -> dict:
    t0 = time.perf_counter()
    fp = fingerprint(folder, SIZE, SIZE, "stretch")
    t1 = time.perf_counter()
    result = sync_folder(folder, never_called, (4, SIZE // 8, SIZE // 8), SIZE, SIZE, "stretch", "pool", batch_size=32)
    t2 = time.perf_counter()
    source = DatabaseShields(ShieldDatabase(result.database).snapshot())
    t3 = time.perf_counter()
    assert result.encoded == 0 and len(source) == result.kept
    source.snapshot.wait_held()  # the latents' copy in RAM, filled in the background (searches read disk until then)
    t4 = time.perf_counter()
    return {"fingerprint_s": t1 - t0, "sync_s": t2 - t1, "open_s": t3 - t2, "total_s": t3 - t0, "held_s": t4 - t3,
            "shields": len(source), "fingerprint": fp[:12]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--cold-child", action="store_true")
    args = parser.parse_args()
    folder = make_folder(args.images)
    if args.cold_child:
        print(json.dumps(reload(folder)))
        return
    t0 = time.perf_counter()
    built = sync_folder(folder, pool_encoder, (4, SIZE // 8, SIZE // 8), SIZE, SIZE, "stretch", "pool", batch_size=32)
    build_s = time.perf_counter() - t0
    warm = [reload(folder) for _ in range(3)]
    child = [sys.executable, "-m", "benchmarks.shield_db_reload", "--images", str(args.images), "--cold-child"]
    cold = [json.loads(subprocess.run(child, cwd=REPO, capture_output=True, text=True, check=True).stdout)
            for _ in range(2)]
    rows = ["| reload | fingerprint s | sync s | open s | total s | then latents held in RAM (background) s |",
            "|---|---|---|---|---|---|"]
    for name, runs in (("warm (same process)", warm), ("cold (new process)", cold)):
        med = {k: float(np.median([r[k] for r in runs])) for k in ("fingerprint_s", "sync_s", "open_s", "total_s",
                                                                    "held_s")}
        rows.append(f"| {name} | {med['fingerprint_s']:.3f} | {med['sync_s']:.3f} | {med['open_s']:.3f} | "
                    f"{med['total_s']:.3f} | {med['held_s']:.3f} |")
    table = "\n".join(rows)
    print(f"{args.images} images, first build (stand-in encoder) {build_s:.1f} s, {built.summary()}")
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shield_db_reload.json").write_text(json.dumps({"images": args.images, "build_s": build_s,
                                                               "warm": warm, "cold": cold}, indent=1))
    (RESULTS / "shield_db_reload.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
