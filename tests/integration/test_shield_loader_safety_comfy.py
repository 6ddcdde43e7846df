"""Shield Set Loader in the real ComfyUI under hostile folders: FIFOs and device links never hang it, Cancel
stops it with its progress kept, links out of the allowed roots are not read, a linked cache is refused."""
import os
import threading

import numpy as np
import pytest
import torch

from test_shield_loader_comfy import SIZE, counted, load, loader, shields_root, tiny_vae, write_images  # noqa: F401

POSIX = pytest.mark.skipif(os.name != "posix", reason="FIFOs and device files are POSIX features")
HANG_GUARD_SECONDS = 120


def images(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]


def snapshot_files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@POSIX
def test_fifos_and_device_links_never_hang_the_node(comfy_nodes, loader, tiny_vae, shields_root):
    folder = shields_root / "odd"
    write_images(folder, images(2, 0))
    os.mkfifo(folder / "pipe.png")
    (folder / "pipe_link.png").symlink_to(folder / "pipe.png")
    (folder / "null.png").symlink_to("/dev/null")
    outcome = {}

    def run():
        try:
            outcome["result"] = load(loader, "odd", tiny_vae)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(HANG_GUARD_SECONDS)
    if worker.is_alive():  # release the blocked open() so the thread (and the database lock) can end
        os.close(os.open(folder / "pipe.png", os.O_WRONLY | os.O_NONBLOCK))
        worker.join(HANG_GUARD_SECONDS)
        pytest.fail(f"the Shield Set Loader blocked on a FIFO for {HANG_GUARD_SECONDS} s")
    assert "error" not in outcome, outcome.get("error")
    shield_set, report = outcome["result"]
    assert len(shield_set) == 2
    for name, why in (("pipe.png", "FIFO"), ("pipe_link.png", "link to a FIFO"), ("null.png", "character device")):
        assert f"{name} (" in report and why in report, report
    again, _ = load(loader, "odd", tiny_vae)  # the lock was released, the set is served again
    assert len(again) == 2


def test_cancel_stops_the_node_build_and_keeps_its_progress(comfy_nodes, loader, tiny_vae, shields_root):
    import comfy.model_management as mm
    write_images(shields_root / "cancel", images(6, 1))
    calls, restore = counted(tiny_vae)
    original = tiny_vae.encode

    def encode_then_cancel(pixels):  # the user presses Cancel while the first batch is being encoded
        out = original(pixels)
        mm.interrupt_current_processing(True)
        return out
    tiny_vae.encode = encode_then_cancel
    try:
        with pytest.raises(mm.InterruptProcessingException):
            load(loader, "cancel", tiny_vae, batch_size=2)
        assert calls == [2]
    finally:
        mm.interrupt_current_processing(False)
        restore()
    calls, restore = counted(tiny_vae)
    try:
        shield_set, report = load(loader, "cancel", tiny_vae, batch_size=2)
    finally:
        restore()
    assert sum(calls) == 4 and len(shield_set) == 6 and "4 encoded" in report and "2 unchanged" in report


@POSIX
def test_links_leading_out_of_the_roots_are_not_read(comfy_nodes, loader, tiny_vae, shields_root, tmp_path):
    folder, private = shields_root / "linked", tmp_path / "private"
    write_images(folder, images(2, 2))
    write_images(shields_root / "other_set", images(1, 3))
    write_images(private, images(1, 4))
    (folder / "leak.png").symlink_to(private / "protected_0.png")
    (folder / "from_other_set.png").symlink_to(shields_root / "other_set" / "protected_0.png")
    shield_set, report = load(loader, "linked", tiny_vae)
    assert "leak.png (a link to a file outside the allowed folders" in report, report
    assert sorted(shield_set.labels) == ["from_other_set.png", "protected_0.png", "protected_1.png"]
    assert shield_set.thumbnails(torch.arange(len(shield_set))).shape[0] == 3


@POSIX
def test_a_linked_cache_is_refused_and_nothing_is_written(comfy_nodes, loader, tiny_vae, shields_root, tmp_path):
    folder, elsewhere = shields_root / "cache_link", tmp_path / "elsewhere"
    write_images(folder, images(1, 5))
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_bytes(b"not the pack's")
    (folder / ".shield_db").symlink_to(elsewhere, target_is_directory=True)
    before = snapshot_files(elsewhere)
    for rebuild in (False, True):
        with pytest.raises(ValueError, match=r"Shield Set Loader: input 'folder' 'cache_link': .*symbolic link"):
            load(loader, "cache_link", tiny_vae, rebuild=rebuild)
    assert snapshot_files(elsewhere) == before


@POSIX
def test_names_that_are_not_utf8_load_and_show_escaped(comfy_nodes, loader, tiny_vae, shields_root):
    folder = shields_root / "latin1"
    write_images(folder, images(1, 6))
    try:
        os.rename(os.fsencode(folder / "protected_0.png"), os.path.join(os.fsencode(folder), b"caf\xe9.png"))
        with open(os.path.join(os.fsencode(folder), b"notes\xff.txt"), "wb") as handle:
            handle.write(b"text")
    except OSError as exc:
        pytest.skip(f"this file system refuses non-UTF-8 names: {exc}")
    shield_set, report = load(loader, "latin1", tiny_vae)
    assert len(shield_set) == 1 and shield_set.labels == ["caf\\xe9.png"]
    assert "notes\\xff.txt (not an image file" in report and report.encode("utf-8")
    calls, restore = counted(tiny_vae)
    try:
        again, report = load(loader, "latin1", tiny_vae)  # the stored names match the folder: nothing re-encoded
    finally:
        restore()
    assert calls == [] and len(again) == 1 and "1 unchanged" in report
