"""Folder -> database: caching by content hash, bad files skipped and listed, path allow-list."""
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shield_db.database import ShieldDatabase
from shield_db.folder import database_folder, fingerprint, sync_folder
from shield_db.images import load_for_encode
from shield_db.paths import read_allow_list, resolve_folder
from shield_db.source import DatabaseShields

W = H = 32
ITEM = (4, H // 8, W // 8)


class FakeVAE:
    """Deterministic stand-in for a VAE: 8x8 average pooling of RGB plus the grey mean; counts calls."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.images += len(pixels)
        x = pixels.astype(np.float32) / 255.0
        b = len(x)
        pooled = x.reshape(b, H // 8, 8, W // 8, 8, 3).mean((2, 4)).transpose(0, 3, 1, 2)
        return np.concatenate([pooled, pooled.mean(1, keepdims=True)], 1)


def sync(folder, vae, **kw):
    kw.setdefault("batch_size", 3)
    return sync_folder(folder, vae, ITEM, W, H, "center-crop", "fake-vae", **kw)


def save(path: Path, size=(40, 30), seed=0, mode="RGB", fmt=None):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return path


def good_folder(tmp_path, n=5):
    folder = tmp_path / "imgs"
    for i in range(n):
        save(folder / f"img{i}.png", seed=i, size=(32 + 8 * i, 24 + 4 * i))
    return folder


def test_second_load_calls_the_vae_zero_times(tmp_path):
    folder = good_folder(tmp_path)
    first, again = FakeVAE(), FakeVAE()
    r1 = sync(folder, first)
    assert r1.encoded == 5 and first.images == 5 and first.calls == 2
    r2 = sync(folder, again)
    assert again.calls == 0 and r2.kept == 5 and r2.encoded == 0
    src = DatabaseShields(ShieldDatabase(r2.database).snapshot())
    assert len(src) == 5 and sorted(src.sources(range(5))) == [f"img{i}.png" for i in range(5)]
    expect = first(np.stack([load_for_encode(folder / "img3.png", W, H, "center-crop")]))[0]
    idx = src.sources(range(5)).index("img3.png")
    assert np.allclose(src.latents([idx])[0].numpy(), expect, atol=1e-3)  # fp16 storage


def test_added_removed_renamed_and_touched_files(tmp_path):
    folder = good_folder(tmp_path)
    sync(folder, FakeVAE())
    (folder / "img0.png").unlink()
    (folder / "img1.png").rename(folder / "renamed.png")
    (folder / "img2.png").touch()  # new mtime, same content
    save(folder / "sub" / "new.png", seed=99)
    vae = FakeVAE()
    r = sync(folder, vae)
    assert vae.images == 1 and r.encoded == 1  # only the new content
    assert r.removed == 2 and r.reused == 1  # img0, img1 dropped; renamed.png reuses img1's row
    src = DatabaseShields(ShieldDatabase(r.database).snapshot())
    assert sorted(src.sources(range(len(src)))) == ["img2.png", "img3.png", "img4.png", "renamed.png", "sub/new.png"]
    save(folder / "img3.png", seed=123)  # edited content under the same name
    vae = FakeVAE()
    r = sync(folder, vae)
    assert vae.images == 1 and len(DatabaseShields(ShieldDatabase(r.database).snapshot())) == 5


def test_fingerprint_changes_only_with_the_folder(tmp_path):
    folder = good_folder(tmp_path)
    a = fingerprint(folder, W, H)
    assert fingerprint(folder, W, H) == a
    sync(folder, FakeVAE())  # the cache lives in a hidden subfolder: not part of the fingerprint
    assert fingerprint(folder, W, H) == a
    save(folder / "x.png", seed=7)
    assert fingerprint(folder, W, H) != a
    assert fingerprint(folder, W, 64) != fingerprint(folder, W, H)


def png_claiming(path: Path, width: int, height: int):
    """A tiny valid PNG whose header claims ``width x height`` (a decompression bomb)."""
    save(path, size=(4, 4))
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 17:ihdr + 21] = zlib.crc32(bytes(data[ihdr:ihdr + 17])).to_bytes(4, "big")
    path.write_bytes(bytes(data))


def bad_folder(tmp_path) -> Path:
    folder = tmp_path / "bad"
    save(folder / "rgb.png", seed=1)
    save(folder / "grey.png", seed=2, mode="L")
    save(folder / "alpha.png", seed=3, mode="RGBA")
    save(folder / "cmyk.jpg", seed=4, mode="CMYK")
    save(folder / "palette.gif", seed=5, mode="P")
    save(folder / "bw.bmp", seed=6, mode="1")
    deep = np.random.default_rng(7).integers(0, 65536, (30, 40), dtype=np.uint16)
    Image.fromarray(deep).save(folder / "sixteen.png")  # I;16 PNG
    assert Image.open(folder / "sixteen.png").mode.startswith("I")
    save(folder / "huge.jpg", size=(6000, 4000), seed=8)  # decoded at reduced size
    save(folder / "tall.png", size=(16, 300), seed=9)
    save(folder / "tiny.png", size=(3, 2), seed=10)
    png_claiming(folder / "bomb.png", 40000, 40000)
    full = save(folder / "cut.jpg", size=(64, 64), seed=11).read_bytes()
    (folder / "cut.jpg").write_bytes(full[: len(full) // 2])
    full = save(folder / "cut.png", size=(64, 64), seed=12).read_bytes()
    (folder / "cut.png").write_bytes(full[: len(full) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.jpg").write_bytes(b"this is text with a jpg name")
    return folder


GOOD = {"rgb.png", "grey.png", "alpha.png", "cmyk.jpg", "palette.gif", "bw.bmp", "sixteen.png", "huge.jpg", "tall.png", "tiny.png"}
BAD = {"bomb.png", "cut.jpg", "cut.png", "empty.png", "notes.txt", "fake.jpg"}


def test_bad_folder_encodes_the_good_and_lists_the_bad(tmp_path):
    folder = bad_folder(tmp_path)
    vae = FakeVAE()
    r = sync(folder, vae)
    skipped = {s["source"]: s["reason"] for s in r.skipped}
    assert set(skipped) == BAD, skipped
    assert "not an image" in skipped["notes.txt"] and "too large" in skipped["bomb.png"]
    src = DatabaseShields(ShieldDatabase(r.database).snapshot())
    assert set(src.sources(range(len(src)))) == GOOD
    grey = src.latents([src.sources(range(len(src))).index("grey.png")])[0]
    assert np.allclose(grey[0], grey[1], atol=1e-3) and np.allclose(grey[1], grey[2], atol=1e-3)  # grey stays grey
    sixteen = load_for_encode(folder / "sixteen.png", W, H, "stretch")
    assert 60 < sixteen.mean() < 200  # rescaled from 16 bits, not clipped to white
    vae2 = FakeVAE()
    r2 = sync(folder, vae2)  # bad files are remembered, not re-decoded; good ones not re-encoded
    assert vae2.calls == 0 and {s["source"] for s in r2.skipped} == BAD


def test_bad_files_never_lose_stored_shields(tmp_path):
    folder = good_folder(tmp_path)
    sync(folder, FakeVAE())
    for name in ("cut.png", "empty.png", "notes.txt"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = sync(folder, FakeVAE())
    assert len(DatabaseShields(ShieldDatabase(r.database).snapshot())) == 5
    assert {s["source"] for s in r.skipped} == {"cut.png", "empty.png", "notes.txt"}


def test_empty_folder_gives_an_empty_database(tmp_path):
    (tmp_path / "none").mkdir()
    r = sync(tmp_path / "none", FakeVAE())
    assert len(DatabaseShields(ShieldDatabase(r.database).snapshot())) == 0


def test_resize_modes_give_the_target_size(tmp_path):
    path = save(tmp_path / "wide.png", size=(100, 20))
    for mode in ("center-crop", "pad", "stretch"):
        assert load_for_encode(path, 48, 32, mode).shape == (32, 48, 3)
    padded = load_for_encode(path, 48, 48, "pad")
    assert padded[:10].max() == 0 and padded[-10:].max() == 0  # black bars above and below
    with pytest.raises(ValueError, match="resize mode"):
        load_for_encode(path, 48, 48, "zoom")


def test_cache_key_depends_on_vae_and_size(tmp_path):
    keys = {database_folder(tmp_path, v, w, h, m) for v, w, h, m in
            [("a", 32, 32, "pad"), ("b", 32, 32, "pad"), ("a", 64, 32, "pad"), ("a", 32, 32, "stretch")]}
    assert len(keys) == 4


def test_paths_outside_the_roots_are_refused(tmp_path, monkeypatch):
    root, other = tmp_path / "input", tmp_path / "elsewhere"
    (root / "shields").mkdir(parents=True)
    (other / "secret").mkdir(parents=True)
    (root / "link").symlink_to(other / "secret")
    assert resolve_folder("shields", [root], []) == (root / "shields").resolve()
    for name in ("../elsewhere/secret", "link", str(other / "secret")):
        with pytest.raises(ValueError, match="folder"):
            resolve_folder(name, [root], [])
    with pytest.raises(ValueError, match="not a directory"):
        resolve_folder("missing", [root], [])
    allow = tmp_path / "allowed_roots.txt"
    allow.write_text(f"# protected sets\n{other}\nrelative/is/ignored\n")
    monkeypatch.delenv("SHIELD_SET_ALLOWED_ROOTS", raising=False)
    allowed = read_allow_list(allow)
    assert allowed == [other]
    assert resolve_folder(str(other / "secret"), [root], allowed) == (other / "secret").resolve()
    with pytest.raises(ValueError, match="outside the allowed roots"):
        resolve_folder(str(tmp_path), [root], allowed)
    monkeypatch.setenv("SHIELD_SET_ALLOWED_ROOTS", str(tmp_path / "x"))
    assert read_allow_list(None) == [tmp_path / "x"]


def test_unchanged_folder_does_not_rewrite_the_database(tmp_path):
    folder = bad_folder(tmp_path)
    first = sync(folder, FakeVAE())
    manifest_file = first.database / "manifest.json"
    before = manifest_file.stat().st_mtime_ns, manifest_file.read_bytes()
    again = sync(folder, FakeVAE())
    assert (manifest_file.stat().st_mtime_ns, manifest_file.read_bytes()) == before
    assert again.kept == first.kept + first.reused + first.encoded and again.encoded == 0
    assert sorted(s["source"] for s in again.skipped) == sorted(s["source"] for s in first.skipped)


def test_changed_bad_files_and_new_non_images_are_noticed(tmp_path):
    folder = bad_folder(tmp_path)
    sync(folder, FakeVAE())
    save(folder / "cut.png", seed=11)  # the truncated PNG is now a good image
    (folder / "readme.md").write_text("not an image")
    vae = FakeVAE()
    r = sync(folder, vae)
    assert vae.images == 1 and "cut.png" in DatabaseShields(ShieldDatabase(r.database).snapshot()).sources(
        range(len(GOOD) + 1))
    assert "readme.md" in {s["source"] for s in r.skipped} and "cut.png" not in {s["source"] for s in r.skipped}
    (folder / "readme.md").unlink()
    r = sync(folder, FakeVAE())
    assert "readme.md" not in {s["source"] for s in r.skipped}
