"""The device feature screen (guidance/feature_screen.py) and the in-memory / database sources built on it:
exact against float64 brute force, and only features on the sampling device."""
import logging

import numpy as np
import pytest
import torch

import guidance.feature_screen as fs
from guidance.shields import TensorShields
from shield_db.database import ShieldDatabase
from shield_db.projection import features
from shield_db.source import DatabaseShields

SHAPE = (4, 8, 8)
DIM = 256


def brute_within(z: torch.Tensor, q: torch.Tensor, radius: float) -> set:
    """Indices of shields within ``radius`` (closed) of some query: float64 from the exact stored values."""
    d = torch.cdist(q.reshape(len(q), -1).double(), z.reshape(len(z), -1).double())
    return set((d <= radius).any(0).nonzero().flatten().tolist())


def clustered(n: int, seed: int, spread: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // 50), DIM, generator=g) * 3
    pick = torch.randint(0, centres.shape[0], (n,), generator=g)
    return (centres[pick] + spread * torch.randn(n, DIM, generator=g)).reshape(n, *SHAPE).half()


def with_exact_radius(z: torch.Tensor, rows: list, step: float = 2.0) -> torch.Tensor:
    """Queries exactly ``step`` from the given shields: one fp16 element moved by a power of two (exact in fp32)."""
    q = z[rows].float().clone()
    q[:, 0, 0, 0] += step
    return q


@pytest.mark.parametrize("kind", ["random", "clustered", "duplicates"])
@pytest.mark.parametrize("qdtype", [torch.float32, torch.float64])
def test_screened_tensor_shields_equal_float64_brute_force(kind, qdtype):
    g = torch.Generator().manual_seed(1)
    if kind == "random":
        z = torch.randn(700, *SHAPE, generator=g).half()
    elif kind == "clustered":
        z = clustered(700, seed=2)
    else:
        z = clustered(350, seed=3)
        z = torch.cat([z, z])                     # every shield twice
    src = TensorShields(z, screen_min_rows=0)
    assert src.screened and src.shields.dtype == torch.float16
    q = torch.cat([with_exact_radius(z, [5, 40, 41]),
                   z[100:105].float() + 0.3 * torch.randn(5, *SHAPE, generator=g)]).to(qdtype)
    d = torch.cdist(q.reshape(len(q), -1).double(), z.reshape(len(z), -1).double())
    radii = [2.0, float(d.flatten().kthvalue(25).values), float(d.flatten().kthvalue(200).values), 1e-3]
    for r in radii:
        got = src.within_indices(q, r).tolist()
        assert got == sorted(got) and set(got) == brute_within(z, q, r), (kind, r)
    assert {5, 40, 41} <= set(src.within_indices(q[:3], 2.0).tolist())   # exactly at the radius: a hit
    assert 5 not in set(src.within_indices(q[:1], 2.0 * (1 - 1e-6)).tolist())
    dist, idx = src.nearest(q)
    truth = d.min(1).values
    assert torch.allclose(dist.double(), truth, rtol=1e-5, atol=1e-6)
    assert torch.equal(d[torch.arange(len(q)), idx], truth)              # an exactly nearest one (ties allowed)


def test_screen_and_full_pass_agree_and_within_returns_the_stored_shields():
    z = clustered(600, seed=4)
    q = z[:6].float() + 0.2
    screened, full = TensorShields(z, screen_min_rows=0), TensorShields(z, screen_min_rows=10 ** 9)
    assert screened.screened and not full.screened
    for r in (0.5, 3.0, 8.0):
        assert torch.equal(screened.within_indices(q, r), full.within_indices(q, r))
        idx = screened.within_indices(q, r)
        assert torch.equal(screened.within(q, r), z[idx].float())


def test_only_features_live_on_the_device():
    """The full latents stay on the CPU in fp16; the device holds [K, 65] float32 features and their norms."""
    z = clustered(800, seed=5)
    src = TensorShields(z.float())                # lossless in fp16: stored as fp16
    device = torch.device("cpu")
    assert src.to(device) is src
    screen = src.screen(device)
    assert src.shields.dtype == torch.float16 and src.shields.device.type == "cpu"
    assert screen.feats.shape == (800, fs.FEATURE_DIM + 1) and screen.feats.dtype == torch.float32
    assert screen.feats.device == device and screen.sq.shape == (800,)
    big = [k for k, v in vars(src).items() if isinstance(v, torch.Tensor) and v.numel() >= 800 * DIM]
    assert all(vars(src)[k].dtype == torch.float16 for k in big)        # no float32 copy of the latents
    assert src.within(z[:2].float(), 1.0).shape[1:] == SHAPE


def test_storage_keeps_values_that_fp16_would_change():
    z = torch.randn(5, *SHAPE) * 1000 + 0.1
    assert TensorShields(z).shields.dtype == torch.float32
    assert torch.equal(TensorShields(z).shields, z)
    assert TensorShields(z, dtype=torch.float16).shields.dtype == torch.float16
    with pytest.raises(ValueError, match="range of torch.float16"):
        TensorShields(z * 1000, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not match"):
        TensorShields(z).within(torch.zeros(1, 3, 8, 8), 1.0)


def test_screen_stays_exact_with_reduced_precision_matmul(monkeypatch):
    """A device that rounds matmul inputs to bfloat16 widens the bound: more candidates, still no miss."""
    z = clustered(600, seed=6)
    q = with_exact_radius(z, [3, 300], step=1.0)
    exact = TensorShields(z, screen_min_rows=0)
    feats, norms = fs.map_features(q, *exact._map_for(q.device))
    ieee = exact.screen(q.device).candidates(feats, norms, 1.0)
    monkeypatch.setattr(fs, "input_roundoff", lambda device: 2.0 ** -8)
    coarse = TensorShields(z, screen_min_rows=0)
    wide = coarse.screen(q.device).candidates(feats, norms, 1.0)
    assert set(ieee.tolist()) <= set(wide.tolist())
    assert set(coarse.within_indices(q, 1.0).tolist()) == brute_within(z, q, 1.0) >= {3, 300}


def test_feature_screen_is_a_superset_of_feature_space_balls():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(5000, 65, generator=g) * 10
    screen = fs.FeatureScreen(feats, max_norm=0.0, feature_error=0.0)
    q = feats[:4] + torch.randn(4, 65, generator=g) * 0.5
    d = torch.cdist(q.double(), feats.double())
    slack = 2.2 * (fs.dot_error_factor(65, q.device) + 4 * fs.U32) * float(q.square().sum(1).max() + screen.max_sq)
    for r in (0.1, 1.0, float(d.flatten().kthvalue(40).values)):
        found = set(screen.candidates(q, torch.zeros(4, dtype=torch.float64), r).tolist())
        assert set((d <= r).any(0).nonzero().flatten().tolist()) <= found
        assert found <= set((d.square() <= r * r * 1.00001 + 2 * slack).any(0).nonzero().flatten().tolist())


def make_db(tmp_path, data: np.ndarray) -> ShieldDatabase:
    db = ShieldDatabase(tmp_path / "db")
    with db.writer(item_shape=SHAPE) as txn:
        txn.add_batch([f"img{i}.png" for i in range(len(data))], [f"{i:064x}" for i in range(len(data))], data)
    return db


def test_database_device_screen_covers_the_index_screen_and_brute_force(tmp_path):
    data = clustered(900, seed=8)
    db = make_db(tmp_path, data.numpy())
    with db.writer() as txn:
        for i in range(0, 900, 7):
            txn.remove(f"img{i}.png")                 # dead rows are never reported
    snap = db.snapshot()
    device, index_path = DatabaseShields(snap, small_set_rows=0), DatabaseShields(snap, small_set_rows=0, screen="index")
    assert device.device_screen() is not None and len(device.device_screen()) == len(device)
    live = torch.from_numpy(snap.read_rows(device.rows))
    q = torch.cat([with_exact_radius(data, [8, 9]), data[200:204].float() + 0.3])
    feats, norms = features(q.reshape(len(q), -1).numpy(), snap.index.mu, snap.index.a)
    for r in (2.0, 4.0, 9.0):
        rows = device.within_rows(q, r)
        assert np.array_equal(rows, index_path.within_rows(q, r))
        assert set(np.searchsorted(device.rows, rows).tolist()) == brute_within(live, q, r)
        screened = device.device_screen().candidates(torch.from_numpy(feats), torch.from_numpy(norms), r)
        assert set(rows.tolist()) <= set(device.rows[screened.numpy()].tolist())   # what an accelerator would scan
    assert {8, 9} <= set(device.within_rows(q[:2], 2.0).tolist())
    dist, idx = device.nearest(q)
    d = torch.cdist(q.reshape(len(q), -1).double(), live.reshape(len(live), -1).double())
    assert torch.equal(idx, d.argmin(1)) and torch.allclose(dist.double(), d.min(1).values, rtol=1e-6)


def test_database_falls_back_to_the_index_when_stored_features_disagree(tmp_path, caplog, monkeypatch):
    data = clustered(300, seed=9)
    snap = make_db(tmp_path, data.numpy()).snapshot()
    import shield_db.source as source_mod
    real = source_mod.faiss_rows
    monkeypatch.setattr(source_mod, "faiss_rows", lambda *a: real(*a) * 0.5)   # not the map queries go through
    src = DatabaseShields(snap, small_set_rows=0)
    q = with_exact_radius(data, [10])
    with caplog.at_level(logging.WARNING, logger="shielded_sampling"):
        assert src.device_screen() is None
    rows = src.within_rows(q, 2.0)
    assert "do not match" in caplog.text
    assert set(rows.tolist()) == brute_within(data, q, 2.0)


def test_map_features_is_the_same_map_for_one_chunk_and_many_and_leaves_its_input_alone():
    """Query batches take the one-chunk path; a set takes the chunked one: same values bit for bit, and a float64
    input is not modified (the centring is never done in place on the caller's tensor)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(fs.FEATURE_CHUNK_ROWS * 2 + 7, 40, generator=gen, dtype=torch.float64)
    before = x.clone()
    mu, a = fs.fit_map(x.float(), 6)
    feats, norms = fs.map_features(x, mu, a)
    assert torch.equal(x, before)
    for lo in (0, fs.FEATURE_CHUNK_ROWS - 3, fs.FEATURE_CHUNK_ROWS * 2):
        part_feats, part_norms = fs.map_features(x[lo:lo + 8], mu, a)
        assert torch.equal(part_feats, feats[lo:lo + 8]) and torch.equal(part_norms, norms[lo:lo + 8])


def test_database_check_runs_the_shared_exact_test_and_decides_open_pairs_in_float64(tmp_path, monkeypatch):
    """shield_db verifies candidates with guidance.feature_screen.within_mask, on the queries' device, with that
    device's rounding bound: a bfloat16-wide bound leaves most pairs open, and float64 must decide each of them."""
    data = clustered(800, seed=10)
    snap = make_db(tmp_path, data.numpy()).snapshot()
    q = torch.cat([with_exact_radius(data, [20, 21, 400]), data[500:505].float() + 0.3])
    reference = {r: DatabaseShields(snap, small_set_rows=0).within_rows(q, r) for r in (2.0, 5.0)}
    calls = []
    real = fs.within_mask
    monkeypatch.setattr(fs, "within_mask", lambda queries, *a, **k: calls.append(queries) or real(queries, *a, **k))
    monkeypatch.setattr(fs, "input_roundoff", lambda device: 2.0 ** -8)
    for small_set_rows in (0, 10_000):                   # through the index, and the whole set without it
        src = DatabaseShields(snap, small_set_rows=small_set_rows)
        for r in (2.0, 5.0):
            rows = src.within_rows(q, r)
            assert set(rows.tolist()) == brute_within(data, q, r) and np.array_equal(rows, reference[r])
        assert {20, 21, 400} <= set(src.within_rows(q[:3], 2.0).tolist())           # exactly at the radius
        assert 20 not in set(src.within_rows(q[:1], 2.0 * (1 - 1e-6)).tolist())
    assert calls and all(c.dtype == torch.float32 and c.device == q.device for c in calls)
