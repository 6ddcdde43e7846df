"""shield_db crash safety: corrupted files named, resume after a killed build, writers serialised."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import faiss
from shield_db import feature_index
from shield_db.database import ShieldDatabase
from shield_db.errors import CorruptDatabaseError, DatabaseLockedError
from shield_db.lock import database_lock
from shield_db.source import DatabaseShields

REPO = Path(__file__).resolve().parents[1]
SHAPE = (4, 4, 4)


def built(tmp_path, n=40):
    db = ShieldDatabase(tmp_path / "db")
    data = np.random.default_rng(0).standard_normal((n, *SHAPE)).astype(np.float16)
    with db.writer(item_shape=SHAPE) as w:
        w.add_batch([f"s{i}" for i in range(n)], [f"{i:064x}" for i in range(n)], data)
    return db


def flip_byte(path: Path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_names(exc, path: Path):
    text = str(exc.value)
    assert path.name in text and "rebuild" in text.lower(), text


def test_edited_shard_is_detected(tmp_path):
    db = built(tmp_path)
    shard = next((db.folder / "shards").glob("*.safetensors"))
    flip_byte(shard, shard.stat().st_size - 3)
    with pytest.raises(CorruptDatabaseError) as exc:
        db.snapshot()
    assert_names(exc, shard)


def test_truncated_shard_is_detected(tmp_path):
    db = built(tmp_path)
    shard = next((db.folder / "shards").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptDatabaseError) as exc:
        db.snapshot()
    assert_names(exc, shard)
    assert "truncated" in str(exc.value)


def test_missing_shard_is_detected(tmp_path):
    db = built(tmp_path)
    shard = next((db.folder / "shards").glob("*.safetensors"))
    shard.unlink()
    with pytest.raises(CorruptDatabaseError) as exc:
        db.snapshot()
    assert_names(exc, shard)


@pytest.mark.parametrize("damage", ["edit", "truncate", "garbage"])
def test_damaged_manifest_is_detected(tmp_path, damage):
    db = built(tmp_path)
    path = db.folder / "manifest.json"
    text = path.read_text()
    if damage == "edit":
        doc = json.loads(text)
        doc["body"]["items"][0][2] = 1  # point an item at another row, keep valid JSON
        path.write_text(json.dumps(doc))
    elif damage == "truncate":
        path.write_text(text[: len(text) // 2])
    else:
        path.write_bytes(b"\x00\xff" * 10)
    with pytest.raises(CorruptDatabaseError) as exc:
        db.snapshot()
    assert_names(exc, path)


def test_damaged_index_is_detected_before_faiss_reads_it(tmp_path, monkeypatch):
    db = built(tmp_path)
    index = next((db.folder / "index").glob("*.faiss"))
    flip_byte(index, index.stat().st_size // 2)
    read = []
    monkeypatch.setattr(feature_index.faiss, "read_index", lambda *a: read.append(a) or faiss.read_index(*a))
    with pytest.raises(CorruptDatabaseError) as exc:
        db.snapshot()
    assert_names(exc, index)
    assert read == []  # faiss never parsed the damaged file


def test_rebuild_recovers_a_corrupt_database(tmp_path):
    db = built(tmp_path)
    (db.folder / "manifest.json").write_text("{")
    with db.writer(item_shape=SHAPE, rebuild=True) as w:
        w.add("a", "a" * 64, np.ones(SHAPE))
    assert len(DatabaseShields(db.snapshot())) == 1
    assert len(list((db.folder / "shards").glob("*"))) == 1  # old shards cleaned up


SLOW_BUILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from shield_db.folder import sync_folder
    def slow(pixels):
        time.sleep(0.25)
        return np.zeros((len(pixels), 4, 4, 4), np.float32) + pixels.mean((1, 2, 3))[:, None, None, None] / 255
    sync_folder(sys.argv[1], slow, (4, 4, 4), 32, 32, "stretch", "v", batch_size=2, commit_rows=2,
                database=sys.argv[2])
""")


def test_killed_build_resumes(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(16):
        Image.fromarray(np.full((32, 32, 3), i * 10, np.uint8)).save(folder / f"{i:02d}.png")
    dbdir = tmp_path / "db"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(folder), str(dbdir)], cwd=REPO)
    db = ShieldDatabase(dbdir)
    deadline = time.monotonic() + 120
    committed = 0
    while committed < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            committed = len(json.loads((dbdir / "manifest.json").read_text())["body"]["items"])
        except (OSError, ValueError, KeyError):
            pass
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = len(DatabaseShields(db.snapshot()))  # readable right after the kill
    assert 6 <= stored < 16
    calls = []

    def counting(pixels):
        calls.append(len(pixels))
        return np.zeros((len(pixels), 4, 4, 4), np.float32) + pixels.mean((1, 2, 3))[:, None, None, None] / 255

    from shield_db.folder import sync_folder
    r = sync_folder(folder, counting, (4, 4, 4), 32, 32, "stretch", "v", batch_size=2, database=dbdir)
    assert sum(calls) == 16 - stored and r.kept == stored
    src = DatabaseShields(db.snapshot())
    assert len(src) == 16
    means = sorted(float(src.latents([i]).mean()) for i in range(16))
    assert np.allclose(means, [i * 10 / 255 for i in range(16)], atol=1e-3)
    referenced = {e["file"] for e in src.snapshot.body["shards"]}
    assert {f"shards/{p.name}" for p in (dbdir / "shards").iterdir()} == referenced  # no orphans left


WRITER = textwrap.dedent("""
    import sys, time, json
    import numpy as np
    from shield_db.database import ShieldDatabase
    tag = sys.argv[2]
    with ShieldDatabase(sys.argv[1]).writer(item_shape=(4, 4, 4)) as w:
        start = time.time()
        for i in range(5):
            w.add(f"{tag}{i}", f"{tag}{i}".ljust(64, "0"), np.full((4, 4, 4), i, np.float32))
            time.sleep(0.1)
        w.flush()
        end = time.time()
    print(json.dumps([start, end]))
""")


def test_concurrent_writers_are_serialised(tmp_path):
    dbdir = tmp_path / "db"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(dbdir), tag], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    spans = sorted(json.loads(p.communicate(timeout=180)[0]) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert spans[0][1] <= spans[1][0]  # one transaction ended before the other began
    src = DatabaseShields(ShieldDatabase(dbdir).snapshot())
    assert sorted(src.sources(range(len(src)))) == [f"{t}{i}" for t in "ab" for i in range(5)]


def test_lock_timeout_names_the_database(tmp_path):
    dbdir = tmp_path / "db"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from shield_db.lock import database_lock
        with database_lock(Path({str(dbdir)!r}), exclusive=True):
            print("locked", flush=True)
            time.sleep(30)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DatabaseLockedError, match=str(dbdir)):
            with database_lock(dbdir, exclusive=True, timeout=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()
    with database_lock(dbdir, exclusive=True, timeout=5):  # released when the holder dies
        pass


def test_checksums_are_remembered_across_processes_per_file_version(tmp_path, monkeypatch):
    """A fresh process trusts a shard whose size, mtime and inode match its recorded hash; any rewrite is re-hashed."""
    from shield_db import checksums
    db = built(tmp_path)
    monkeypatch.setattr(checksums, "RACY_MARGIN_NS", 0)  # files written this instant count as settled here
    monkeypatch.setattr(checksums, "_MEMORY", {})  # the writer's own verdicts are kept in memory only
    db.snapshot()  # hashes the shards once and records the verdicts in verified.json
    assert (db.folder / checksums.RECORD_NAME).is_file()
    monkeypatch.setattr(checksums, "_MEMORY", {})  # as in a new process
    hashed = []
    real = checksums.sha256_file
    monkeypatch.setattr(checksums, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    db.snapshot()
    assert hashed == []
    shard = next((db.folder / "shards").glob("*.safetensors"))
    flip_byte(shard, shard.stat().st_size - 3)  # a rewrite: new mtime
    monkeypatch.setattr(checksums, "_MEMORY", {})
    with pytest.raises(CorruptDatabaseError) as exc:
        db.snapshot()
    assert_names(exc, shard)
    assert hashed == [shard.name]


def test_verify_rehashes_even_when_the_stat_is_unchanged(tmp_path):
    db = built(tmp_path)
    db.snapshot()
    shard = next((db.folder / "shards").glob("*.safetensors"))
    st = shard.stat()
    with open(shard, "r+b") as handle:  # edit in place, then put the old mtime back
        handle.seek(st.st_size - 3)
        byte = handle.read(1)
        handle.seek(st.st_size - 3)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = subprocess.run([sys.executable, "-m", "shield_db", "verify", str(db.folder)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 1 and shard.name in out.stdout + out.stderr
