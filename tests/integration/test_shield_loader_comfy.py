"""Shield Set Loader in the real ComfyUI: folder -> tiny random VAE -> SPELL Sampler keeps every output out.

The VAE is ComfyUI's own ``comfy.sd.VAE`` built from a small AutoencoderKL config (32 channels, 3 downsamples,
4 latent channels, random weights): the same code path as an SD1.5 VAE, just small enough for CPU tests.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import shield_harness as h

SIZE = 32
STEPS = 8
DENOISE = 0.3


@pytest.fixture(scope="module")
def loader(pack):
    return h.pack_submodule("nodes.shield_loader")


@pytest.fixture(scope="module")
def tiny_vae(comfy_nodes):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": SIZE, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"embed_dim": 4, "ddconfig": ddconfig}}
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, t in AutoencoderKL(**config["params"]).state_dict().items():
        if name.endswith("bias"):
            sd[name] = torch.zeros(t.shape)
        elif "norm" in name:
            sd[name] = torch.ones(t.shape)
        else:
            sd[name] = torch.randn(t.shape, generator=gen) / max(1, t[0].numel()) ** 0.5
    vae = comfy.sd.VAE(sd=sd, config=config, dtype=torch.float32)
    assert vae.first_stage_model is not None
    # A random encoder's latents are huge; rescale its last 1x1 conv so latents are SD-sized (std ~1/0.18215).
    with torch.inference_mode():
        probe = vae.encode(torch.rand(4, SIZE, SIZE, 3, generator=gen))
    vae.first_stage_model.quant_conv.weight.data.mul_(1 / (0.18215 * float(probe.std())))
    return vae


def counted(vae):
    """Count VAE encode calls by wrapping the instance's method."""
    calls = []
    original = vae.encode

    def encode(pixels):
        calls.append(pixels.shape[0])
        return original(pixels)
    vae.encode = encode
    return calls, lambda: vars(vae).pop("encode")


@pytest.fixture()
def shields_root(tmp_path, loader, monkeypatch):
    import folder_paths
    root = tmp_path / "models_shields"
    root.mkdir()
    paths = folder_paths.folder_names_and_paths[loader.SHIELDS_FOLDER][0]
    monkeypatch.setattr(folder_paths, "folder_names_and_paths",
                        {**folder_paths.folder_names_and_paths, loader.SHIELDS_FOLDER: ([str(root)] + paths, set())})
    monkeypatch.delenv("SHIELD_SET_ALLOWED_ROOTS", raising=False)
    return root


def write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"protected_{i}.png")


def load(loader, folder, vae, **kw):
    args = dict(folder=folder, vae=vae, width=SIZE, height=SIZE, resize="center-crop", batch_size=4, rebuild=False)
    args.update(kw)
    return loader.ShieldSetLoader().load(**args)


def test_loader_is_registered(comfy_nodes, pack, loader):
    import folder_paths
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ShieldSetLoader"] == "Shield Set Loader"
    assert "shields" in folder_paths.folder_names_and_paths
    inputs = loader.ShieldSetLoader.INPUT_TYPES()["required"]
    assert all("tooltip" in spec[1] for spec in inputs.values())


def test_folder_to_spell_sampler_protects_every_output(comfy_nodes, loader, spell_nodes, tiny_model, tiny_vae,
                                                      shields_root):
    rng = np.random.default_rng(0)
    write_images(shields_root / "client", [rng.integers(0, 256, (SIZE + 8 * i, SIZE, 3), dtype=np.uint8) for i in range(6)])
    calls, restore = counted(tiny_vae)
    try:
        shield_set, report = load(loader, "client", tiny_vae)
        assert len(shield_set) == 6 and sum(calls) == 6 and "6 encoded" in report
        again, _ = load(loader, "client", tiny_vae)
        assert sum(calls) == 6  # second load: zero VAE calls
    finally:
        restore()
    assert len(again) == 6
    shields = again.source.latents(range(6))
    fmt = tiny_model.model.latent_format

    def dist(out):
        a = fmt.process_in(out.clone()).flatten(1).double()
        return torch.cdist(a, fmt.process_in(shields.clone()).flatten(1).double())

    # img2img from three protected images at low denoise: unshielded, the outputs are near-copies of them
    start = {"samples": shields[:3].clone()}
    plain = h.ksample(comfy_nodes, tiny_model, start, seed=7, steps=STEPS, denoise=DENOISE)["samples"]
    elements = math.prod(plain.shape[1:])
    unshielded = dist(plain)
    radius_rms = float(unshielded.min(1).values.max()) * 1.25 / math.sqrt(elements)
    assert radius_rms < 4.0, radius_rms  # inside the node's slider range
    assert (unshielded.min(1).values < radius_rms * math.sqrt(elements)).all()  # every output inside a shield
    res = spell_nodes.SpellSampler().sample(
        tiny_model, 7, STEPS, 5.0, "euler", "normal", h.conditioning(1), h.conditioning(2), start, DENOISE,
        radius=radius_rms, overcompensation=1.0, intra_batch=False, history=False, history_name="loader-test",
        history_size=8, start_percent=0.0, end_percent=1.0, exact=True, shield_set=again)
    out, spell_report = res["result"]
    d = dist(out["samples"])
    assert (d >= spell_report.radius * (1 - 1e-3)).all(), f"min distance {d.min()} < r {spell_report.radius}"
    assert spell_report.shield_count == 6


def test_folder_changes_are_picked_up(comfy_nodes, loader, tiny_vae, shields_root):
    rng = np.random.default_rng(1)
    write_images(shields_root / "grow", [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)])
    before = loader.ShieldSetLoader.IS_CHANGED("grow", SIZE, SIZE, "center-crop", 4, False)
    assert loader.ShieldSetLoader.IS_CHANGED("grow", SIZE, SIZE, "center-crop", 4, False) == before
    load(loader, "grow", tiny_vae)
    assert loader.ShieldSetLoader.IS_CHANGED("grow", SIZE, SIZE, "center-crop", 4, False) == before  # cache is hidden
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(shields_root / "grow" / "new.png")
    (shields_root / "grow" / "notes.txt").write_text("x")
    (shields_root / "grow" / "protected_0.png").unlink()
    assert loader.ShieldSetLoader.IS_CHANGED("grow", SIZE, SIZE, "center-crop", 4, False) != before
    calls, restore = counted(tiny_vae)
    try:
        shield_set, report = load(loader, "grow", tiny_vae)
    finally:
        restore()
    assert sum(calls) == 1 and len(shield_set) == 3 and "notes.txt" in report
    thumbs = shield_set.thumbnails(torch.arange(3))
    assert thumbs.dtype == torch.uint8 and thumbs.shape == (3, 48, 48, 3)
    assert sorted(shield_set.labels) == ["new.png", "protected_1.png", "protected_2.png"]


def test_paths_outside_allowed_roots_are_refused(comfy_nodes, loader, tiny_vae, shields_root, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    write_images(outside, [np.zeros((SIZE, SIZE, 3), np.uint8)])
    for folder in (str(outside), "../outside", ""):
        with pytest.raises(ValueError, match="Shield Set Loader: input 'folder'"):
            load(loader, folder, tiny_vae)
    monkeypatch.setenv("SHIELD_SET_ALLOWED_ROOTS", str(outside))
    shield_set, _ = load(loader, str(outside), tiny_vae)
    assert len(shield_set) == 1


def test_cli_build_is_reused_by_the_node(comfy_nodes, loader, shields_root, tmp_path):
    """`python -m shield_db build` with a VAE file (random TAESD, ComfyUI detects it by its keys), then the node
    loads the same folder with the same VAE file without one VAE call."""
    import os
    import subprocess
    import sys

    import comfy.sd
    import comfy.utils
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(3)
    sd = {k: (torch.zeros(v.shape) if k.endswith("bias") else torch.randn(v.shape, generator=gen) / max(1, v[0].numel() if v.dim() else 1) ** 0.5)
          for k, v in TAESD().state_dict().items()}
    vae_file = tmp_path / "taesd_random.safetensors"
    save_file(sd, str(vae_file))
    rng = np.random.default_rng(4)
    write_images(shields_root / "cli", [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(5)])
    (shields_root / "cli" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    env = {**os.environ, "PYTHONPATH": str(h.comfy_path())}
    run = subprocess.run([sys.executable, "-m", "shield_db", "build", str(shields_root / "cli"), "--vae", str(vae_file),
                          "--width", str(SIZE), "--height", str(SIZE), "--batch-size", "2"],
                         cwd=h.PACK_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "5 encoded" in run.stdout and "broken.png" in run.stdout
    assert "6/6 images" in run.stderr  # the terminal progress bar (the broken file counts as processed)
    check = subprocess.run([sys.executable, "-m", "shield_db", "verify", str(shields_root / "cli")],
                           cwd=h.PACK_ROOT, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.startswith("OK"), check.stderr
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_file)))
    calls, restore = counted(vae)
    try:
        shield_set, report = load(loader, "cli", vae)
    finally:
        restore()
    assert calls == [] and len(shield_set) == 5 and "broken.png" in report


def test_loaded_set_is_held_in_ram_within_the_budget(comfy_nodes, loader, tiny_vae, shields_root, monkeypatch):
    """The loader's set gathers its latents from RAM (the stored bytes); a budget of 0 reads them from the shards,
    and a budget that is not a number stops the node with the variable's name and the fix."""
    rng = np.random.default_rng(8)
    write_images(shields_root / "held_ram", [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(5)])
    resident = h.pack_submodule("shield_db.resident")
    monkeypatch.delenv(resident.RESIDENT_MB_ENV, raising=False)
    held, _ = load(loader, "held_ram", tiny_vae)
    monkeypatch.setenv(resident.RESIDENT_MB_ENV, "0")
    on_disk, _ = load(loader, "held_ram", tiny_vae)
    assert held.source.snapshot.wait_held(timeout=60)   # filled in the background after the node returned
    assert all(isinstance(s.latent_reader, resident.ResidentRows) for s in held.source.snapshot.shards)
    assert not any(isinstance(s.latent_reader, resident.ResidentRows) for s in on_disk.source.snapshot.shards)
    assert torch.equal(held.source.latents(range(5)), on_disk.source.latents(range(5)))
    monkeypatch.setenv(resident.RESIDENT_MB_ENV, "1GB")
    with pytest.raises(ValueError, match="Shield Set Loader: SHIELDED_SAMPLING_RESIDENT_MB='1GB'.*unset it"):
        load(loader, "held_ram", tiny_vae)
