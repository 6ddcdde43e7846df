"""Shield Set Loader with backend 'postgres' in the real ComfyUI: folder -> tiny random VAE -> a private PostgreSQL
server -> SPELL Sampler keeps every output out; unchanged folders cost no VAE call; passwords in the DSN refused.

Skips (with the reason) without psycopg in the host's Python or without PostgreSQL's server binaries.
"""
import math
import os
import tempfile

import numpy as np
import pytest
import torch

import shield_harness as h
from test_shield_loader_comfy import (DENOISE, SIZE, STEPS, counted, load, loader, shields_root,  # noqa: F401
                                      tiny_vae, write_images)

try:
    import psycopg  # noqa: F401
except ImportError:
    if os.environ.get("SHIELDED_REQUIRE_HOSTS") == "1":
        raise RuntimeError("psycopg is required here (SHIELDED_REQUIRE_HOSTS=1) but missing from this host's Python; "
                           "tests/host/setup.sh installs tests/requirements.txt")
    pytest.skip("psycopg is not installed in this host's Python (pip install 'psycopg[binary]'): the PostgreSQL "
                "backend of the Shield Set Loader is not tested", allow_module_level=True)


@pytest.fixture(scope="module")
def embedded(pack):
    server_mod = h.pack_submodule("shield_db.postgres.server")
    try:
        server_mod.find_bin_dir()
    except Exception as err:  # PostgresUnavailableError from the pack's own import path
        if os.environ.get("SHIELDED_REQUIRE_HOSTS") == "1":
            pytest.fail(f"PostgreSQL server binaries are required here (SHIELDED_REQUIRE_HOSTS=1): {err}")
        pytest.skip(f"PostgreSQL server binaries not found: {err}")
    root = tempfile.mkdtemp(prefix="shield-pg-node-")
    os.chmod(root, 0o711)  # a server run as 'postgres' (when we are root) must enter it
    patch = pytest.MonkeyPatch()
    patch.setenv(server_mod.DATA_ENV, os.path.join(root, "data"))
    patch.setenv(server_mod.PORT_ENV, str(56900 + os.getpid() % 90))
    yield server_mod
    server_mod.EmbeddedServer(os.path.join(root, "data"), port=int(os.environ[server_mod.PORT_ENV])).stop("immediate")
    patch.undo()
    import shutil
    shutil.rmtree(root, ignore_errors=True)


def test_postgres_backend_protects_every_output(comfy_nodes, loader, spell_nodes, tiny_model, tiny_vae,  # noqa: F811
                                                shields_root, embedded):  # noqa: F811
    rng = np.random.default_rng(0)
    write_images(shields_root / "pg", [rng.integers(0, 256, (SIZE + 8 * i, SIZE, 3), dtype=np.uint8) for i in range(6)])
    calls, restore = counted(tiny_vae)
    try:
        shield_set, report = load(loader, "pg", tiny_vae, backend="postgres", dsn="embedded")
        assert len(shield_set) == 6 and sum(calls) == 6 and "6 encoded" in report and "PostgreSQL" in report
        again, report = load(loader, "pg", tiny_vae, backend="postgres", dsn="embedded")
        assert sum(calls) == 6 and "6 unchanged" in report  # second load: zero VAE calls
    finally:
        restore()
    assert type(again.source).__name__ == "PostgresShields" and again.source.feature_type in ("cube", "vector")
    files, _ = load(loader, "pg", tiny_vae)  # the file backend encodes the same folder to the same latents
    assert torch.allclose(again.source.latents(range(6)).sort(0).values, files.source.latents(range(6)).sort(0).values)
    shields = again.source.latents(range(6))
    fmt = tiny_model.model.latent_format

    def dist(out):
        a = fmt.process_in(out.clone()).flatten(1).double()
        return torch.cdist(a, fmt.process_in(shields.clone()).flatten(1).double())

    start = {"samples": shields[:3].clone()}
    plain = h.ksample(comfy_nodes, tiny_model, start, seed=7, steps=STEPS, denoise=DENOISE)["samples"]
    unshielded = dist(plain)
    radius_rms = float(unshielded.min(1).values.max()) * 1.25 / math.sqrt(math.prod(plain.shape[1:]))
    res = spell_nodes.SpellSampler().sample(
        tiny_model, 7, STEPS, 5.0, "euler", "normal", h.conditioning(1), h.conditioning(2), start, DENOISE,
        radius=radius_rms, overcompensation=1.0, intra_batch=False, history=False, history_name="pg-test",
        history_size=8, start_percent=0.0, end_percent=1.0, exact=True, shield_set=again)
    out, spell_report = res["result"]
    assert (unshielded.min(1).values < spell_report.radius).all()  # unshielded, every output is inside a shield
    assert (dist(out["samples"]) >= spell_report.radius * (1 - 1e-3)).all()
    assert spell_report.shield_count == 6


def test_password_in_the_dsn_is_refused(comfy_nodes, loader, tiny_vae, shields_root):  # noqa: F811
    write_images(shields_root / "pw", [np.zeros((SIZE, SIZE, 3), np.uint8)])
    with pytest.raises(ValueError, match="input 'dsn' contains a password"):
        load(loader, "pw", tiny_vae, backend="postgres", dsn="host=db user=me password=secret")
