"""Folder inputs that must never fool or hang a build: files replaced mid-build, names that are not UTF-8,
FIFOs and devices, links out of the allowed roots or into folders, a linked cache, the pixel limit."""
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shield_db import images, manifest
from shield_db.database import ShieldDatabase
from shield_db.manifest import SHA, SIZE, SOURCE
from shield_db.folder import database_folder, sync_folder
from shield_db.images import FileChanged, UnusableImage, decode_for_encode, load_for_encode, read_file
from shield_db.paths import UnsafeCacheError
from shield_db.source import DatabaseShields

W = H = 32
ITEM = (4, H // 8, W // 8)
PACK_ROOT = Path(__file__).resolve().parents[1]
DOCS = PACK_ROOT / "docs" / "shield_sets.md"
POSIX = pytest.mark.skipif(os.name != "posix", reason="FIFOs, devices and arbitrary name bytes are POSIX features")


def pool(pixels: np.ndarray) -> np.ndarray:
    """Stand-in VAE: 8x8 average pooling of RGB plus the grey mean."""
    x = pixels.astype(np.float32) / 255.0
    pooled = x.reshape(len(x), H // 8, 8, W // 8, 8, 3).mean((2, 4)).transpose(0, 3, 1, 2)
    return np.concatenate([pooled, pooled.mean(1, keepdims=True)], 1)


class CountingVAE:
    def __init__(self, before_call=None):
        self.images, self.calls, self.before_call = 0, 0, before_call

    def __call__(self, pixels):
        if self.before_call is not None:
            self.before_call(self.calls)
        self.calls += 1
        self.images += len(pixels)
        return pool(pixels)


def sync(folder, vae, **kw):
    kw.setdefault("batch_size", 2)
    return sync_folder(folder, vae, ITEM, W, H, "center-crop", "fake-vae", **kw)


def png_bytes(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def stored(result) -> dict:
    """source -> (sha256, latent float32) of every item of the database."""
    snap = ShieldDatabase(result.database).snapshot()
    return {it[SOURCE]: (it[SHA], snap.read_rows(np.array([it[2]]))[0].astype(np.float32)) for it in snap.body["items"]}


def expected_latent(data: bytes) -> np.ndarray:
    return pool(decode_for_encode(data, W, H, "center-crop")[None])[0]


# ---- 1. a file replaced while the build runs


def test_file_replaced_mid_build_is_stored_under_the_hash_of_the_bytes_encoded(tmp_path):
    folder = tmp_path / "imgs"
    old, new = png_bytes(2), png_bytes(3)
    write(folder / "a.png", png_bytes(1))
    write(folder / "x.png", old)
    write(folder / "z_copy.png", old)  # the old content, elsewhere in the folder

    def replace_x(call):  # while a.png is being encoded, x.png is replaced (after it was hashed)
        if call == 0:
            write(tmp_path / "x.tmp", new)
            os.replace(tmp_path / "x.tmp", folder / "x.png")

    result = sync(folder, CountingVAE(replace_x), batch_size=1)
    items = stored(result)
    assert items["x.png"][0] == hashlib.sha256(new).hexdigest()
    assert np.allclose(items["x.png"][1], expected_latent(new), atol=2e-3)
    assert items["z_copy.png"][0] == hashlib.sha256(old).hexdigest()
    assert np.allclose(items["z_copy.png"][1], expected_latent(old), atol=2e-3)  # the old content is shielded
    st = os.stat(folder / "x.png")
    item = next(it for it in ShieldDatabase(result.database).snapshot().body["items"] if it[SOURCE] == "x.png")
    assert (item[SIZE], item[4]) == (st.st_size, st.st_mtime_ns)  # stat of the read, not of the scan
    again = CountingVAE()
    sync(folder, again)
    assert again.calls == 0


def test_one_read_gives_hash_bytes_and_stat_together(tmp_path, monkeypatch):
    path = write(tmp_path / "f.png", png_bytes(4))
    read = read_file(path)
    assert read.sha256 == hashlib.sha256(read.data).hexdigest() and read.data == path.read_bytes()
    assert (read.size, read.mtime_ns) == (os.stat(path).st_size, os.stat(path).st_mtime_ns)
    assert read_file(path, keep=False).data is None
    real_read, grown = os.read, []

    def read_then_grow(fd, n):  # another process appends to the file during the first read
        chunk = real_read(fd, n)
        if not grown:
            grown.append(1)
            with open(path, "ab") as handle:
                handle.write(b"appended")
        return chunk
    monkeypatch.setattr(images.os, "read", read_then_grow)
    again = read_file(path)  # the changed read is thrown away and read again
    assert again.data == path.read_bytes() and again.data.endswith(b"appended")
    assert again.sha256 == hashlib.sha256(again.data).hexdigest() and again.size == len(again.data)


def test_file_that_keeps_changing_is_skipped_and_tried_again(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    write(folder / "busy.png", png_bytes(5))
    write(folder / "calm.png", png_bytes(6))
    real_read, busy = os.read, folder / "busy.png"

    def always_growing(fd, n):  # busy.png is appended to during every read of it
        chunk = real_read(fd, n)
        if os.fstat(fd).st_ino == os.stat(busy).st_ino:
            with open(busy, "ab") as handle:
                handle.write(b"x")
        return chunk
    monkeypatch.setattr(images.os, "read", always_growing)
    result = sync(folder, CountingVAE())
    monkeypatch.undo()
    skipped = {s["source"]: s for s in result.skipped}
    assert "changed while being read" in skipped["busy.png"]["reason"] and set(stored(result)) == {"calm.png"}
    again = sync(folder, CountingVAE())  # no stat was remembered for it: tried again, now stable
    assert set(stored(again)) == {"busy.png", "calm.png"} and not again.skipped


# ---- 3. names that are not UTF-8


def make_bytes_name(folder: Path, name: bytes, data: bytes) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
            handle.write(data)
    except OSError as exc:
        pytest.skip(f"this file system refuses non-UTF-8 names: {exc}")
    return os.fsdecode(name)


@POSIX
def test_names_that_are_not_utf8_are_stored_losslessly(tmp_path):
    folder = tmp_path / "latin1"
    cafe = make_bytes_name(folder, b"caf\xe9.png", png_bytes(7))
    notes = make_bytes_name(folder, b"notes\xff.txt", b"text")
    write(folder / "plain.png", png_bytes(8))
    vae = CountingVAE()
    result = sync(folder, vae)
    assert vae.images == 2 and {s["source"] for s in result.skipped} == {notes}
    raw = (result.database / manifest.MANIFEST_NAME).read_bytes()
    raw.decode("utf-8")  # strict: the manifest stays valid UTF-8 JSON
    body = manifest.load(result.database)
    names = {it[SOURCE] for it in body["items"]}
    assert names == {cafe, "plain.png"}
    assert {os.fsencode(n) for n in names} == {b"caf\xe9.png", b"plain.png"}  # the exact bytes on disk
    assert os.fsencode(body["skipped"][0]["source"]) == b"notes\xff.txt"
    assert "notes\\xff.txt" in result.summary()  # shown escaped to people
    again = CountingVAE()
    second = sync(folder, again)
    assert again.calls == 0 and second.kept == 2 and second.removed == 0


def test_manifest_bytes_of_utf8_names_are_unchanged():
    body = {"items": [["été/ça 😀.png", "ab", 0, 1, 2]], "skipped": []}
    old_format = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert manifest.canonical(body) == old_format  # existing databases keep their checksum
    odd = {"items": [["caf\udce9\udcff.png", "ab", 0, 1, 2]]}
    assert json.loads(manifest.canonical(odd)) == odd


# ---- 4. FIFOs and devices never hang a build; the host's interrupt is honoured


def run_build_in_child(folder: Path, timeout: float = 120):
    """Build ``folder`` in a child process; a hang is killed and reported instead of blocking the test run."""
    code = (
        "import json, sys\n"
        "from shield_db.folder import sync_folder\n"
        "from test_shield_db_inputs import pool\n"
        f"r = sync_folder(sys.argv[1], pool, {ITEM!r}, {W}, {H}, 'center-crop', 'fake-vae')\n"
        "print(json.dumps({'encoded': r.encoded, 'skipped': {s['source']: s['reason'] for s in r.skipped}}))\n")
    try:
        env = {**os.environ, "PYTHONPATH": f"{PACK_ROOT}{os.pathsep}{PACK_ROOT / 'tests'}"}
        run = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=PACK_ROOT, env=env, capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the build of {folder} hung (killed after {timeout} s)")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@POSIX
def test_fifos_and_links_to_devices_are_skipped_not_read(tmp_path):
    folder = tmp_path / "odd"
    write(folder / "good.png", png_bytes(9))
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(tmp_path / "outside_pipe")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "null.jpg").symlink_to("/dev/null")
    (folder / "linked_pipe.png").symlink_to(folder / "pipe.png")
    out = run_build_in_child(folder)
    assert out["encoded"] == 1
    skipped = out["skipped"]
    assert set(skipped) == {"pipe.png", "zero.png", "null.jpg", "linked_pipe.png"}
    assert "FIFO" in skipped["pipe.png"] and "not a regular file" in skipped["pipe.png"]
    assert "character device" in skipped["zero.png"] and "FIFO" in skipped["linked_pipe.png"]


@POSIX
def test_read_file_refuses_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    for path in (tmp_path / "pipe.png", Path("/dev/zero"), tmp_path):
        with pytest.raises(UnusableImage, match="not a regular file"):
            read_file(path)
    big = write(tmp_path / "big.png", b"\0" * 1000)
    with pytest.raises(UnusableImage, match="too large: 1000 bytes"):
        read_file(big, max_bytes=999)


class Interrupted(BaseException):
    """Stands for ComfyUI's InterruptProcessingException (a BaseException in recent versions)."""


def test_interrupt_stops_the_build_and_keeps_what_was_encoded(tmp_path):
    folder = tmp_path / "imgs"
    for i in range(6):
        write(folder / f"img{i}.png", png_bytes(20 + i))
    checks, vae = [], CountingVAE()

    def interrupted():  # the host's flag goes up after two batches were encoded
        checks.append(1)
        if vae.calls >= 2:
            raise Interrupted()
    with pytest.raises(Interrupted):
        sync(folder, vae, batch_size=2, interrupted=interrupted)
    assert vae.images == 4 and len(checks) > 6  # checked per file while hashing and per batch
    body = manifest.load(database_folder(folder, "fake-vae", W, H, "center-crop"))
    assert len(body["items"]) == 4  # committed although fewer than commit_rows
    rest = CountingVAE()
    result = sync(folder, rest, batch_size=2, interrupted=lambda: None)
    assert rest.images == 2 and result.kept == 4 and result.encoded == 2


def test_interrupt_while_hashing_calls_no_vae(tmp_path):
    folder = tmp_path / "imgs"
    write(folder / "a.png", png_bytes(30))

    def stop():
        raise Interrupted()
    vae = CountingVAE()
    with pytest.raises(Interrupted):
        sync(folder, vae, interrupted=stop)
    assert vae.calls == 0


# ---- 13. nothing outside the allowed roots is read or written


def test_links_out_of_the_allowed_roots_are_skipped_and_listed(tmp_path):
    root, outside = tmp_path / "input", tmp_path / "private"
    folder = root / "set"
    write(folder / "own.png", png_bytes(40))
    write(root / "other_set" / "shared.png", png_bytes(41))
    write(outside / "secret.png", png_bytes(42))
    (folder / "leak.png").symlink_to(outside / "secret.png")
    (folder / "sibling.png").symlink_to(root / "other_set" / "shared.png")
    result = sync(folder, CountingVAE(), allowed_roots=[root])
    skipped = {s["source"]: s["reason"] for s in result.skipped}
    assert set(skipped) == {"leak.png"} and "outside the allowed folders" in skipped["leak.png"]
    assert set(stored(result)) == {"own.png", "sibling.png"}
    assert DatabaseShields(ShieldDatabase(result.database).snapshot()).thumbnails([0, 1]).shape[0] == 2
    only_folder = sync(folder, CountingVAE())  # default root: the folder itself; the sibling link is dropped
    assert set(stored(only_folder)) == {"own.png"}
    assert {s["source"] for s in only_folder.skipped} == {"leak.png", "sibling.png"}


def cache_of(folder: Path) -> Path:
    return database_folder(folder, "fake-vae", W, H, "center-crop")


def listing(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("link", [".shield_db", "key", "shards", "lock"])
def test_a_cache_path_with_a_link_is_refused_and_nothing_is_written(tmp_path, link):
    folder, outside = tmp_path / "set", tmp_path / "outside"
    write(folder / "a.png", png_bytes(50))
    write(outside / "victim.txt", b"keep me")
    (outside / "shards").mkdir()
    write(outside / "shards" / "shard-000001.safetensors", b"not ours")
    cache = cache_of(folder)
    if link == ".shield_db":
        (folder / ".shield_db").symlink_to(outside)
    elif link == "key":
        cache.parent.mkdir(parents=True)
        cache.symlink_to(outside)
    else:
        sync(folder, CountingVAE())
        target = outside / ("shards" if link == "shards" else "victim.txt")
        path = cache / link
        if path.is_dir():
            for p in path.iterdir():
                p.unlink()
            path.rmdir()
        else:
            path.unlink()
        path.symlink_to(target)
    before = listing(outside)
    with pytest.raises(UnsafeCacheError, match="symbolic link"):
        sync(folder, CountingVAE(), rebuild=True)
    with pytest.raises(UnsafeCacheError, match="nothing was written"):
        sync(folder, CountingVAE())
    with pytest.raises(UnsafeCacheError, match="symbolic link"):  # as `python -m shield_db build` names it
        sync(folder, CountingVAE(), database=cache)
    assert listing(outside) == before


@POSIX
def test_a_fifo_in_the_cache_is_refused(tmp_path):
    folder = tmp_path / "set"
    write(folder / "a.png", png_bytes(51))
    sync(folder, CountingVAE())
    (cache_of(folder) / "manifest.json").unlink()
    os.mkfifo(cache_of(folder) / "manifest.json")
    with pytest.raises(UnsafeCacheError, match="FIFO"):
        sync(folder, CountingVAE())


# ---- 14. the pixel limit is the documented one


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels."""
    data = bytearray(png_bytes(0, size=(4, 4)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 17:ihdr + 21] = zlib.crc32(bytes(data[ihdr:ihdr + 17])).to_bytes(4, "big")
    return bytes(data)


DOCUMENTED_PIXELS = 89_478_485


def test_pixel_limit_is_the_documented_one(monkeypatch):
    text = DOCS.read_text(encoding="utf-8")
    documented = {int(m.replace(",", "")) for m in re.findall(r"([\d,]{9,}) pixels", text)}
    assert documented == {DOCUMENTED_PIXELS} == {images.MAX_PIXELS}
    at_limit = png_claiming(DOCUMENTED_PIXELS // 5, 5)  # 17,895,697 x 5: the limit exactly (pixel data cut off)
    assert (DOCUMENTED_PIXELS // 5) * 5 == DOCUMENTED_PIXELS
    for pil_limit in (Image.MAX_IMAGE_PIXELS, None):  # another pack lifting PIL's limit does not lift ours
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
        for over in (png_claiming(DOCUMENTED_PIXELS + 1, 1), png_claiming(9460, 9460)):
            with pytest.raises(UnusableImage, match="too large"):
                decode_for_encode(over, W, H, "center-crop")
        with pytest.raises(UnusableImage, match="cannot decode: .*truncated"):  # past the size check: decoded
            decode_for_encode(at_limit, W, H, "center-crop")


# ---- 16. a link to a folder named like an image


def test_link_to_a_folder_named_like_an_image_is_skipped_and_listed(tmp_path):
    folder = tmp_path / "set"
    write(folder / "a.png", png_bytes(60))
    write(folder / "real_dir.png" / "inner.png", png_bytes(61))  # a real folder: its images are included
    (folder / "album.png").symlink_to(folder / "real_dir.png", target_is_directory=True)
    result = sync(folder, CountingVAE())
    skipped = {s["source"]: s["reason"] for s in result.skipped}
    assert set(skipped) == {"album.png"} and "link to a folder" in skipped["album.png"]
    assert set(stored(result)) == {"a.png", "real_dir.png/inner.png"}
