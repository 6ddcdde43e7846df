"""Crash and full-disk harness for ``python -m shield_db build`` (issue 13). Slow: run by hand, not in the unit suite.

    python tests/faults/crash_harness.py --mode kill   --points 60   # SIGKILL at file-system steps + random times
    python tests/faults/crash_harness.py --mode enospc --points 60   # a small tmpfs, nearly full, space freed mid-build

The build is the real CLI (``python -m shield_db build``) in a fresh process; ComfyUI is replaced by the stand-in
package ``tests/faults/stub_comfy`` (an instant deterministic pooling "VAE" read from a safetensors file).

kill: the steps of an uninterrupted build are counted (``kill_at.py``), then for each point a fresh build is
SIGKILLed at step K (sampled over all steps, at least a third of them in the finish phase: merge, index refit
and write, final manifest, cleanup) or after a random delay. enospc: the database lives on a tmpfs (mounted
here, needs root) filled by a filler file so that only F bytes are free (F random, up to what a build needs);
for some points another thread deletes the filler after a random delay ("space freed by another process").

After each point: (1) the database opens (if a manifest was committed; on the still full disk for enospc
points) and every shield it holds equals the clean build's, and no orphan file is left after the next open
(once space is freed); (2) the same build command run again succeeds;
(3) ``python -m shield_db verify`` passes (its ``main``, called in the harness process); (4) the database equals a clean build (same sources, byte-equal
latents and thumbnails); (5) no orphan or temp file and no maintenance owed. Exit 1 if any point fails.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
from shield_db import checksums  # noqa: E402
from shield_db.cli import main as cli_main  # noqa: E402
from shield_db.database import ShieldDatabase  # noqa: E402
from shield_db.transaction import maintenance_owed  # noqa: E402

IMAGES, SIZE = 48, 16


def setup(work: Path) -> tuple[Path, Path]:
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (SIZE + i % 3, SIZE, 3), dtype=np.uint8)).save(images / f"img{i:03d}.png")
    (images / "notes.txt").write_text("not an image")
    vae = work / "pool_vae.safetensors"
    save_file({"mix": torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.3, 0.3, 0.4]])}, str(vae))
    return images, vae


def build_command(images: Path, vae: Path, db: Path) -> list[str]:
    return ["build", str(images), "--vae", str(vae), "--width", str(SIZE), "--height", str(SIZE), "--resize", "stretch",
            "--batch-size", "4", "--commit-rows", "4", "--thumbnail-size", "8", "--db", str(db), "--cpu"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE / "stub_comfy"), str(REPO)])}


def cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shield_db", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def contents(db: Path) -> dict:
    """source -> (latent bytes, thumbnail bytes) of a database, opened as a new process would."""
    checksums._MEMORY.clear()
    snap = ShieldDatabase(db, lock_timeout=30).snapshot()
    out = {}
    for source, _, row, *_ in snap.body["items"]:
        thumbs = snap.read_thumbnails(np.array([row]))
        out[source] = (snap.read_rows(np.array([row])).tobytes(), None if thumbs is None else thumbs.tobytes())
    return out


def leftovers(db: Path) -> list[str]:
    body = json.loads((db / "manifest.json").read_text())["body"]
    keep = {e["file"] for e in body["shards"]}
    if body["index"]:
        keep |= {body["index"][k]["file"] for k in ("basis", "faiss")}
    files = {f"{sub}/{p.name}" for sub in ("shards", "index") if (db / sub).is_dir() for p in (db / sub).iterdir()}
    temps = [p.name for p in db.glob(".*.tmp")]
    return sorted(files - keep) + temps + (["maintenance owed"] if maintenance_owed(db, body) else [])


def check_point(db: Path, reference: dict, images: Path, vae: Path, free_space=None) -> list[str]:
    """Steps (1)-(5) of the module docstring; returns the problems found.

    ``free_space`` (full-disk points) is called after a first open on the still full disk (which must work;
    owed maintenance may have to wait) and before the open that must leave no orphan.
    """
    problems = []
    if (db / "manifest.json").exists():
        try:
            partial = contents(db)  # may finish maintenance a killed run owed
            wrong = [s for s, v in partial.items() if reference.get(s) != v]
            if wrong:
                problems.append(f"after the fault, {len(wrong)} shields differ from the clean build: {wrong[:3]}")
            if free_space is not None:
                free_space()
                contents(db)
            if leftovers(db):
                problems.append(f"orphans after the next open: {leftovers(db)}")
        except Exception as exc:  # noqa: BLE001 (the harness reports every kind of failure)
            problems.append(f"does not open after the fault: {type(exc).__name__}: {exc}")
    if free_space is not None:
        free_space()
    rerun = cli(build_command(images, vae, db))
    if rerun.returncode != 0:
        problems.append(f"rebuild failed: {rerun.stderr[-500:]}")
        return problems
    if cli_main(["verify", str(db)]) != 0:  # the CLI's verify, in this process (one torch import less per point)
        problems.append("verify failed")
    try:
        if contents(db) != reference:
            problems.append("differs from a clean build")
        if leftovers(db):
            problems.append(f"orphans after the rebuild: {leftovers(db)}")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"does not open after the rebuild: {type(exc).__name__}: {exc}")
    return problems


def run_kill(work: Path, images: Path, vae: Path, reference: dict, points: int, rng: random.Random) -> dict:
    db = work / "kill_db"
    log = work / "steps.log"
    shutil.rmtree(db, ignore_errors=True)
    log.unlink(missing_ok=True)
    started = time.monotonic()
    count = subprocess.run([sys.executable, str(HERE / "kill_at.py"), "0", str(log), "--", *build_command(images, vae, db)],
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    duration = time.monotonic() - started
    assert count.returncode == 0, count.stderr
    steps = [line.split() for line in log.read_text().splitlines()]
    finish = [int(n) for n, _, ph in steps if ph == "finish"]
    others = [int(n) for n, _, ph in steps if ph != "finish"]
    step_points = points - points // 5
    chosen = rng.sample(finish, min(len(finish), max(step_points // 3, step_points - len(others))))
    chosen += rng.sample(others, min(len(others), step_points - len(chosen)))
    plan = [("step", k) for k in sorted(chosen)] + [("time", rng.uniform(0.2, duration)) for _ in range(points - len(chosen))]
    stats = Counter()
    failures = []
    for kind, value in plan:
        shutil.rmtree(db, ignore_errors=True)
        log.unlink(missing_ok=True)
        if kind == "step":
            proc = subprocess.run([sys.executable, str(HERE / "kill_at.py"), str(value), str(log), "--",
                                   *build_command(images, vae, db)], cwd=REPO, env=env(), capture_output=True, timeout=600)
            phase = log.read_text().splitlines()[-1].split()[2] if log.exists() and log.read_text() else "?"
            killed = proc.returncode == -signal.SIGKILL
        else:
            proc = subprocess.Popen([sys.executable, "-m", "shield_db", *build_command(images, vae, db)], cwd=REPO,
                                    env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(value)
            proc.send_signal(signal.SIGKILL)
            killed = proc.wait() == -signal.SIGKILL
            phase = "random time"
        stats[f"{kind}:{phase}:{'killed' if killed else 'finished first'}"] += 1
        problems = check_point(db, reference, images, vae)
        if problems:
            failures.append({"point": f"{kind} {value}", "phase": phase, "problems": problems})
        print(f"kill {sum(stats.values())}/{len(plan)}: {kind} {value} {phase} -> {problems or 'ok'}", file=sys.stderr)
    return {"mode": "kill", "points": len(plan), "build_steps": len(steps), "finish_steps": len(finish),
            "clean_build_seconds": round(duration, 2), "stats": dict(stats), "failures": failures}


def mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def run_enospc(work: Path, images: Path, vae: Path, reference: dict, points: int, rng: random.Random,
               ref_db: Path) -> dict:
    need = sum(-(-p.stat().st_size // 4096) * 4096 for p in ref_db.rglob("*") if p.is_file())  # tmpfs pages
    capacity = 3 * need + 8 * 4096  # a resumed build holds old and merged shards and temp files at once
    mnt = work / "tmpfs"
    mount_tmpfs(mnt, capacity)
    stats, failures = Counter(), []
    try:
        for point in range(points):
            for child in mnt.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            db, filler = mnt / "db", mnt / "filler"
            free = rng.randrange(0, 3 * need // 2)
            with open(filler, "wb") as handle:
                try:
                    handle.write(b"\0" * max(0, capacity - free))
                except OSError:
                    pass
            delay = rng.choice([None, rng.uniform(0.5, 4.0)])
            timer = threading.Timer(delay, lambda: filler.unlink(missing_ok=True)) if delay else None
            if timer:
                timer.start()
            first = cli(build_command(images, vae, db))
            if timer:
                timer.cancel()
            outcome = "built" if first.returncode == 0 else "refused"
            if first.returncode not in (0, 1) or "Traceback" in first.stderr:
                failures.append({"point": point, "problems": [f"crashed (rc {first.returncode}): {first.stderr[-800:]}"]})
            if outcome == "refused" and "No space left" not in first.stderr:
                failures.append({"point": point, "problems": [f"failed without naming the full disk: {first.stderr[-300:]}"]})
            stats[f"{outcome}, space freed {'mid-build' if delay else 'after'}"] += 1
            problems = check_point(db, reference, images, vae, free_space=lambda: filler.unlink(missing_ok=True))
            if problems:
                failures.append({"point": point, "free_bytes": free, "freed_after": delay, "problems": problems})
            print(f"enospc {point + 1}/{points}: free {free} B, freed {delay} -> {outcome}, {problems or 'ok'}",
                  file=sys.stderr)
    finally:
        subprocess.run(["umount", str(mnt)])
    return {"mode": "enospc", "points": points, "tmpfs_bytes": capacity, "clean_db_bytes": need,
            "stats": dict(stats), "failures": failures}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("kill", "enospc", "both"), default="both")
    p.add_argument("--points", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "shield_db_faults")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    images, vae = setup(args.work)
    ref_db = args.work / "clean_db"
    clean = cli(build_command(images, vae, ref_db))
    assert clean.returncode == 0, clean.stderr
    reference = contents(ref_db)
    assert len(reference) == IMAGES
    rng = random.Random(args.seed)
    reports = []
    if args.mode in ("kill", "both"):
        reports.append(run_kill(args.work, images, vae, reference, args.points, rng))
    if args.mode in ("enospc", "both"):
        reports.append(run_enospc(args.work, images, vae, reference, args.points, rng, ref_db))
    print(json.dumps(reports, indent=1))
    return 1 if any(r["failures"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
