"""The guidance math and the shield sources on an accelerator without float64 (MPS), checked on this CPU-only
machine through tests/fake_accelerator.py: no float64 tensor on the device, no operation mixing devices, no host
read of device memory, and the same answers as on the CPU."""
import math

import numpy as np
import pytest
import torch
from fake_accelerator import OnAccelerator, fake_accelerator, to_device

from guidance import eddy
from guidance.dng import DngParams, PosteriorTracker, add_negative_guidance
from guidance.feature_screen import within_mask
from guidance.particle import particle_guidance
from guidance.shields import TensorShields
from guidance.spell import sparse_repellency
from shield_db.database import ShieldDatabase
from shield_db.source import DatabaseShields

SHAPE = (4, 8, 8)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(700, *SHAPE, generator=g).half()
    q = z[:5].float() + 0.1 * torch.randn(5, *SHAPE, generator=g)
    return z, q


def test_the_fake_device_refuses_what_mps_refuses():
    x = torch.randn(4, 3)
    with fake_accelerator():
        with pytest.raises(TypeError, match="float64"):
            to_device(x).double()
        with pytest.raises(TypeError, match="float64"):
            torch.zeros(3, dtype=torch.float64, device="mps")
        with pytest.raises(RuntimeError, match="same device"):
            to_device(x) + torch.ones(4, 3)
        with pytest.raises(TypeError, match="numpy"):
            to_device(x).numpy()
        assert isinstance(x.to("mps"), OnAccelerator) and to_device(x).device.type == "mps"
        assert type(to_device(x).to("cpu", torch.float64)) is torch.Tensor
        doubled = to_device(x) * torch.tensor(2.0)                           # 0-dim CPU scalars are allowed
    assert torch.equal(doubled.cpu(), x * 2)


def test_exact_check_and_in_memory_sets(data):
    z, q = data
    src = TensorShields(z, screen_min_rows=0)
    small = TensorShields(z[:100])
    with fake_accelerator():
        mask = within_mask(to_device(q.reshape(5, -1)), z.reshape(700, -1), 3.0)
        screened = src.within_indices(to_device(q), 3.0)
        dist, idx = src.nearest(to_device(q))
        unscreened = small.within_indices(to_device(q), 3.0)
    assert torch.equal(mask, within_mask(q.reshape(5, -1), z.reshape(700, -1), 3.0)) and mask.any()
    assert torch.equal(screened, src.within_indices(q, 3.0)) and torch.equal(unscreened, small.within_indices(q, 3.0))
    ref_dist, ref_idx = src.nearest(q)
    assert torch.equal(idx.as_subclass(torch.Tensor).cpu(), ref_idx) and torch.allclose(dist.cpu(), ref_dist)


@pytest.mark.parametrize("screen", ["device", "index"])
def test_shield_database_screens_and_checks_on_the_device(tmp_path, data, screen):
    z, q = data
    db = ShieldDatabase(tmp_path / "db")
    with db.writer(item_shape=SHAPE) as txn:
        txn.add_batch([f"i{i}" for i in range(700)], [f"{i:064x}" for i in range(700)], z.numpy())
    src = DatabaseShields(db.snapshot(), small_set_rows=0, screen=screen)
    with fake_accelerator():
        rows = src.within_rows(to_device(q), 3.0)
        found = src.within(to_device(q), 3.0)
        _, idx = src.nearest(to_device(q))
    assert np.array_equal(rows, src.within_rows(q, 3.0)) and len(rows)
    assert isinstance(found, OnAccelerator) and torch.equal(found.cpu(), src.within(q, 3.0))
    assert torch.equal(idx.cpu(), src.nearest(q)[1])


def test_spell_correction_with_shields_and_the_batch(data):
    z, q = data
    src = TensorShields(z, screen_min_rows=0)
    with fake_accelerator():
        moved = sparse_repellency(to_device(q), 3.0, shields=src, intra_batch=True)
    ref = sparse_repellency(q, 3.0, shields=src, intra_batch=True)
    assert torch.equal(moved.denoised.cpu(), ref.denoised) and bool(ref.active.any())
    assert isinstance(moved.denoised, OnAccelerator)


def test_dng_tracks_its_posterior_in_float64_on_the_cpu():
    g = torch.Generator().manual_seed(1)
    x, d_base, d_neg = (torch.randn(3, *SHAPE, generator=g) for _ in range(3))
    steps = [(x, 10.0), (0.5 * x, 5.0), (0.2 * x, 1.0)]
    params = DngParams(lam0=1.0)

    def run(move):
        tracker, out = PosteriorTracker(params, 3), None
        for state, sigma in steps:
            p = tracker.observe(move(state), torch.tensor([sigma]), move(d_base), move(d_neg))
            out = add_negative_guidance(move(d_base), move(d_base), move(d_neg), params.scale(p))
        return p, out

    with fake_accelerator():
        p_dev, out_dev = run(to_device)
    p_cpu, out_cpu = run(lambda t: t)
    assert p_dev.dtype == torch.float64 and torch.equal(p_dev, p_cpu) and not torch.equal(p_cpu, p_cpu.new_full((3,), 0.01))
    assert isinstance(out_dev, OnAccelerator) and torch.equal(out_dev.cpu(), out_cpu)


def test_diversity_noise_and_particle_guidance():
    g = torch.Generator().manual_seed(2)
    z, e = torch.randn(4, *SHAPE, generator=g), torch.randn(4, *SHAPE, generator=g)
    with fake_accelerator():
        coupled = eddy.eddy_noise(to_device(z), 0.5, embedded=to_device(e))
        grid = eddy.exact_marginal_noise(to_device(z), 1.0, grid=2)
        pg = particle_guidance(to_device(e), 0.5)
    assert torch.equal(coupled.cpu(), eddy.eddy_noise(z, 0.5, embedded=e)) and not torch.equal(coupled.cpu(), z)
    assert torch.equal(grid.cpu(), eddy.exact_marginal_noise(z, 1.0, grid=2))
    assert torch.equal(pg.delta.cpu(), particle_guidance(e, 0.5).delta)


def test_webui_percent_window_reads_the_models_schedule_from_the_device():
    """A1111/Forge keep ``alphas_cumprod`` with the model, on MPS on a Mac: the window's sigmas come from a float64
    CPU copy."""
    from shielded_webui.a1111_hook import percent_to_sigma
    alphas = torch.linspace(0.9999, 0.005, 1000)
    with fake_accelerator():
        on_mac = [percent_to_sigma(to_device(alphas), p) for p in (0.0, 0.3, 0.75, 1.0)]
    assert on_mac == [percent_to_sigma(alphas, p) for p in (0.0, 0.3, 0.75, 1.0)] and 0 < on_mac[1] < math.inf
