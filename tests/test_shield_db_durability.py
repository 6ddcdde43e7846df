"""shield_db under full disks, few file descriptors, kills after the last commit, edited files, damaged
records, concurrent verify and read-only media (issue 13, storage items 2, 5-9, 11, 12, 15)."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shield_db import checksums
from shield_db.database import ShieldDatabase
from shield_db.transaction import Transaction
from shield_db.errors import CorruptDatabaseError, ShieldDatabaseError
from shield_db.folder import sync_folder
from shield_db.lock import database_lock
from shield_db.source import DatabaseShields
from shield_db.vae import vae_fingerprint

REPO = Path(__file__).resolve().parents[1]
SHAPE = (4, 4, 4)


def built(tmp_path, n=40, name="db", **txn):
    db = ShieldDatabase(tmp_path / name)
    data = np.random.default_rng(0).standard_normal((n, *SHAPE)).astype(np.float16)
    with db.writer(item_shape=SHAPE) as w:
        for key, value in txn.items():
            setattr(w, key, value)
        w.add_batch([f"s{i}" for i in range(n)], [f"{i:064x}" for i in range(n)], data)
    return db, data


def files_on_disk(folder: Path) -> set:
    return {f"{sub}/{p.name}" for sub in ("shards", "index") for p in (folder / sub).iterdir()}


def referenced_files(body: dict) -> set:
    keep = {e["file"] for e in body["shards"]}
    return keep | ({body["index"][k]["file"] for k in ("basis", "faiss")} if body["index"] else set())


def run(code: str, *args, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kw)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "shield_db", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def image_folder(tmp_path, n, name="imgs"):
    folder = tmp_path / name
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def pooled(pixels):
    """Stand-in encoder: 8x8 RGB -> (4, 2, 2) by 4x4 average pooling plus the grey mean."""
    x = pixels.astype(np.float32) / 255.0
    p = x.reshape(len(x), 2, 4, 2, 4, 3).mean((2, 4)).transpose(0, 3, 1, 2)
    return np.concatenate([p, p.mean(1, keepdims=True)], 1)


# ---- item 2: a short index write is never committed; read errors name the file
FSIZE_BUILD = """
    import resource, signal, sys
    import numpy as np
    from shield_db.database import ShieldDatabase
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    data = np.random.default_rng(0).standard_normal((4000, 4, 4, 4)).astype(np.float16)
    try:
        with ShieldDatabase(sys.argv[1]).writer(item_shape=(4, 4, 4)) as w:
            w.add_batch([f"s{i}" for i in range(4000)], [f"{i:064x}" for i in range(4000)], data)
    except OSError as exc:
        print("FAILED", exc)
        sys.exit(3)
    print("BUILT")
"""


def test_index_larger_than_the_free_space_is_never_committed(tmp_path):
    """The feature index (1 MB) cannot be written in full; shards and manifest (< 800 kB each) can."""
    out = run(FSIZE_BUILD, tmp_path / "db", 800_000)
    assert out.returncode in (0, 3), out.stderr
    assert "FAILED" in out.stdout and "File too large" in out.stdout, out.stdout + out.stderr  # reported, not swallowed
    db = ShieldDatabase(tmp_path / "db")
    body = json.loads((db.folder / "manifest.json").read_text())["body"]
    assert body["index"] is None  # nothing truncated was committed
    src = DatabaseShields(db.snapshot(), small_set_rows=0)
    assert len(src) == 4000
    assert cli("verify", db.folder).returncode == 0


def test_index_read_error_names_the_file(tmp_path):
    """A committed index FAISS cannot parse (here: truncated, checksum made to match) -> the pack's error, not RuntimeError."""
    db, _ = built(tmp_path)
    path = db.folder / "manifest.json"
    doc = json.loads(path.read_text())
    faiss_file = db.folder / doc["body"]["index"]["faiss"]["file"]
    faiss_file.write_bytes(faiss_file.read_bytes()[:-40])
    import hashlib
    from shield_db import manifest
    doc["body"]["index"]["faiss"]["sha256"] = hashlib.sha256(faiss_file.read_bytes()).hexdigest()
    manifest.save(db.folder, doc["body"])
    with pytest.raises(CorruptDatabaseError) as exc:
        db.snapshot()
    assert faiss_file.name in str(exc.value) and "rebuild" in str(exc.value).lower()


def test_short_write_raises_and_leaves_no_file(tmp_path, monkeypatch):
    from shield_db import storage
    real = os.write
    calls = []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data)[:10])  # the disk takes 10 bytes, then nothing
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(storage.os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        storage.write_bytes_atomic(tmp_path / "x.bin", b"a" * 1000)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp file


# ---- item 5: bounded file descriptors
NOFILE_BUILD = """
    import resource, sys
    import numpy as np
    sys.path.insert(0, "tests")
    from test_shield_db_durability import pooled
    from shield_db.folder import sync_folder
    from shield_db.database import ShieldDatabase
    from shield_db.source import DatabaseShields
    import torch, faiss, PIL.Image  # imported before the limit: they open many files once
    limit = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    r = sync_folder(sys.argv[1], pooled, (4, 2, 2), 8, 8, "stretch", "v", batch_size=2, commit_rows=2,
                    database=sys.argv[2])
    snaps = [ShieldDatabase(sys.argv[2]).snapshot() for _ in range(3)]  # a host may hold several
    src = DatabaseShields(snaps[-1], small_set_rows=0)
    print(len(src), len(snaps[-1].shards), len(__import__("os").listdir("/proc/self/fd")))
"""


def test_many_commits_build_and_open_under_a_low_fd_limit(tmp_path):
    folder = image_folder(tmp_path, 300)
    out = run(NOFILE_BUILD, folder, tmp_path / "db", 64)
    assert out.returncode == 0, out.stderr[-3000:]
    shields, shards, fds = map(int, out.stdout.split())
    assert shields == 300 and shards <= 24 and fds < 64


# ---- item 6: a kill after the last commit is finished by the next open
class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even the writer's finish)."""


@pytest.mark.parametrize("where", ["before_merge", "after_index_write"])
def test_kill_after_last_commit_is_finished_on_next_open(tmp_path, monkeypatch, where):
    folder = image_folder(tmp_path, 40)
    dbdir = tmp_path / "db"
    if where == "before_merge":
        monkeypatch.setattr(Transaction, "_merge_small_shards", lambda self, snap: (_ for _ in ()).throw(Killed()))
    else:
        real = Transaction._refresh_index

        def index_then_die(self):
            real(self)
            raise Killed()
        monkeypatch.setattr(Transaction, "_refresh_index", index_then_die)
    with pytest.raises(Killed):
        sync_folder(folder, pooled, (4, 2, 2), 8, 8, "stretch", "v", batch_size=4, commit_rows=4, database=dbdir)
    monkeypatch.undo()
    again = sync_folder(folder, pooled, (4, 2, 2), 8, 8, "stretch", "v", database=dbdir)
    assert again.kept == 40 and again.encoded == 0  # the folder is unchanged: sync returns early
    snap = ShieldDatabase(dbdir).snapshot()
    clean = sync_folder(folder, pooled, (4, 2, 2), 8, 8, "stretch", "v", batch_size=4, commit_rows=4,
                        database=tmp_path / "clean")
    assert clean.encoded == 40
    ref = ShieldDatabase(tmp_path / "clean").snapshot()
    assert snap.index is not None and snap.index.rows == ref.index.rows == 40
    assert [s.rows for s in snap.shards] == [s.rows for s in ref.shards]  # merged as an uninterrupted build
    assert files_on_disk(dbdir) == referenced_files(snap.body)  # no orphans
    assert not snap.body.get("maintenance_pending")
    assert sorted(snap.live_sources) == sorted(ref.live_sources)
    a = {s: snap.read_rows([r])[0] for s, r in zip(snap.live_sources, snap.live_rows)}
    b = {s: ref.read_rows([r])[0] for s, r in zip(ref.live_sources, ref.live_rows)}
    assert all(np.array_equal(a[s], b[s]) for s in a)


# ---- item 7: thumbnail size is part of the database's identity
def test_mixed_thumbnail_sizes_are_refused(tmp_path):
    folder = image_folder(tmp_path, 6)
    dbdir = tmp_path / "db"
    sync_folder(folder, pooled, (4, 2, 2), 8, 8, "stretch", "v", thumbnail_size=16, database=dbdir)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "new.png")
    with pytest.raises(ShieldDatabaseError, match="thumbnails of 16 px.*asked for 8 px"):
        sync_folder(folder, pooled, (4, 2, 2), 8, 8, "stretch", "v", thumbnail_size=8, database=dbdir)
    db = ShieldDatabase(dbdir)
    with pytest.raises(ValueError, match="thumbnail size is 16"):
        with db.writer() as w:
            w.add("x", "x" * 64, np.zeros((4, 2, 2)), thumbnail=np.zeros((8, 8, 3), np.uint8))
    thumbs = DatabaseShields(db.snapshot()).thumbnails(np.arange(6))
    assert thumbs.shape == (6, 16, 16, 3)
    assert cli("verify", dbdir).returncode == 0


# ---- item 8: an edit that restores the mtime is still seen
def test_edit_with_restored_mtime_is_detected(tmp_path, monkeypatch):
    db, _ = built(tmp_path)
    monkeypatch.setattr(checksums, "RACY_MARGIN_NS", 0, raising=False)
    monkeypatch.setattr(checksums, "_MEMORY", {})
    db.snapshot()  # the verdicts are recorded in verified.json
    time.sleep(0.05)  # let the kernel's coarse clock (ctime) tick past the hashing
    shard = next((db.folder / "shards").glob("*.safetensors"))
    st = shard.stat()
    with open(shard, "r+b") as handle:  # edit in place, same size, then put the old mtime back
        handle.seek(st.st_size - 3)
        byte = handle.read(1)
        handle.seek(st.st_size - 3)
        handle.write(bytes([byte[0] ^ 0x40]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns, shard.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    monkeypatch.setattr(checksums, "_MEMORY", {})  # a new process
    with pytest.raises(CorruptDatabaseError, match=shard.name):
        db.snapshot()


def test_verdict_recorded_in_the_files_clock_tick_is_not_reused():
    key = [10, 5_000, 1, 1, 5_000, 0]
    assert checksums._recorded([*key, 5_000 + checksums.RACY_MARGIN_NS, "ab"], key) == "ab"
    assert checksums._recorded([*key, 5_001, "ab"], key) is None  # hashed in the same tick as the last change


# ---- item 9: verified.json is advisory
def test_damaged_verdict_record_does_not_blame_an_intact_shard(tmp_path, monkeypatch):
    db, data = built(tmp_path)
    monkeypatch.setattr(checksums, "RACY_MARGIN_NS", 0, raising=False)
    monkeypatch.setattr(checksums, "_MEMORY", {})
    db.snapshot()
    record = db.folder / checksums.RECORD_NAME
    text = record.read_text()
    sha = re.search(r"[0-9a-f]{64}", text).group(0)
    record.write_text(text.replace(sha, sha[:10] + ("0" if sha[10] != "0" else "1") + sha[11:]))
    monkeypatch.setattr(checksums, "_MEMORY", {})
    src = DatabaseShields(db.snapshot(), small_set_rows=0)
    assert np.array_equal(src.latents(np.arange(len(data))).numpy(), data.astype(np.float32))
    assert sha in record.read_text()  # the record was corrected


# ---- item 11: verify waits for a writer (shared lock)
def test_verify_takes_the_shared_lock(tmp_path):
    db, _ = built(tmp_path)
    shard = next((db.folder / "shards").glob("*.safetensors"))
    aside = tmp_path / "aside"
    with database_lock(db.folder, exclusive=True):  # a writer mid-finish: a referenced file is not there yet
        shard.rename(aside)
        out = cli("verify", "--lock-timeout", "0.5", db.folder)
        aside.rename(shard)
    assert out.returncode == 1 and "NOT CHECKED" in out.stderr and "FAILED" not in out.stderr, out.stderr
    assert cli("verify", db.folder).returncode == 0


# ---- item 12: read-only media
READ_ONLY_USE = """
    import sys
    from shield_db.database import ShieldDatabase
    from shield_db.source import DatabaseShields
    print(len(DatabaseShields(ShieldDatabase(sys.argv[1]).snapshot())))
"""


@pytest.fixture
def read_only_copy(tmp_path):
    """A copy of a database on a read-only tmpfs (as root) or in folders without write permission."""
    def make(db_folder: Path, drop_lock: bool) -> Path:
        mnt = tmp_path / "ro"
        mnt.mkdir()
        if os.geteuid() == 0:
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)]).returncode:
                pytest.skip("running as root without permission to mount a tmpfs: cannot make read-only media")
            mounted.append(mnt)
        target = mnt / "db"
        shutil.copytree(db_folder, target)
        if drop_lock:
            (target / "lock").unlink()
        if os.geteuid() == 0:
            assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)]).returncode == 0
        else:
            for path in [target, *target.rglob("*")]:
                path.chmod(path.stat().st_mode & ~0o222)
        return target
    mounted = []
    yield make
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.parametrize("drop_lock", [False, True])
def test_read_only_database_can_be_verified_inspected_and_loaded(tmp_path, read_only_copy, drop_lock):
    db, _ = built(tmp_path)
    target = read_only_copy(db.folder, drop_lock)
    with pytest.raises(OSError):
        (target / "probe").write_text("x")
    for command in ("verify", "inspect"):
        out = cli(command, target)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    out = run(READ_ONLY_USE, target)
    assert out.returncode == 0 and out.stdout.strip() == "40", out.stderr
    with pytest.raises(ShieldDatabaseError, match="cannot be written"):
        with ShieldDatabase(target).writer():
            pass


# ---- item 15: every VAE weight is in the fingerprint
class TinyVAE:
    def __init__(self, weight: torch.Tensor):
        self.latent_channels = 4
        self.first_stage_model = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.first_stage_model.weight.copy_(weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vae_fingerprint_sees_one_changed_weight(dtype):
    weight = torch.randn(300, 400, generator=torch.Generator().manual_seed(0))
    changed = weight.clone()
    changed[0, 1] += 0.5  # not one of 1,024 evenly spaced samples
    a, b, same = TinyVAE(weight), TinyVAE(changed), TinyVAE(weight)
    for vae in (a, b, same):
        vae.first_stage_model.to(dtype)
    assert vae_fingerprint(a) != vae_fingerprint(b)
    assert vae_fingerprint(a) == vae_fingerprint(same)
