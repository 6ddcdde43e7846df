"""shield_db: exact range/nearest search vs brute force, incremental add/remove, compaction, format checks."""

import numpy as np
import pytest
import torch
from shield_data import brute_within, clustered, make_db, near_and_far

from shield_db.database import ShieldDatabase
from shield_db.projection import features, fit_basis
from shield_db.source import DatabaseShields

SHAPE = (4, 8, 8)


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_range_search_equals_brute_force(tmp_path, kind):
    data = (np.random.default_rng(1).standard_normal((1500, *SHAPE)) if kind == "random" else clustered(1500, SHAPE)).astype(np.float16)
    src = DatabaseShields(make_db(tmp_path, data).snapshot(), small_set_rows=0)
    assert src.use_index
    gen = torch.Generator().manual_seed(2)
    queries = torch.from_numpy(data[:6].astype(np.float32)) + 0.3 * torch.randn(6, *SHAPE, generator=gen)
    _, dist = brute_within(data, queries, 0)
    pruned = 0
    for k in (1, 2, 5, 40):  # radii at the k-th nearest distance: few to many hits
        radius = float(dist.sort(1).values[:, k - 1].max())
        expect, _ = brute_within(data, queries, radius)
        got = src.within_rows(queries, radius)
        assert np.array_equal(got, expect), (kind, k)
        found = src.within(queries, radius)
        assert found.shape == (len(expect), *SHAPE)
        assert torch.equal(found, torch.from_numpy(data[expect].astype(np.float32)))
        pruned = max(pruned, len(data) - len(src.snapshot.index.candidates(queries.numpy().reshape(6, -1), radius)))
    assert pruned > 0  # the feature index really filters


def test_query_exactly_at_radius_is_inside(tmp_path):
    data = clustered(600, SHAPE, seed=3)
    src = DatabaseShields(make_db(tmp_path, data).snapshot(), small_set_rows=0)
    q = torch.from_numpy(data[[10, 20]].astype(np.float32))
    q[0, 1, 2, 3] += 2.0  # exactly 2.0 from shield 10 (fp16 + 2 is exact in float32)
    q[1, 0, 0, 0] -= 2.0
    exact = ((q.double() - torch.from_numpy(data[[10, 20]].astype(np.float64))) ** 2).sum((1, 2, 3)).sqrt()
    assert exact.tolist() == [2.0, 2.0]
    rows = src.within_rows(q, 2.0)
    assert 10 in rows and 20 in rows
    expect, _ = brute_within(data, q, 2.0)
    assert np.array_equal(rows, expect)
    just_inside = src.within_rows(q[:1], 2.0 * (1 - 1e-6))  # a hair smaller: shield 10 is out, as brute force says
    assert 10 not in just_inside and np.array_equal(just_inside, brute_within(data, q[:1], 2.0 * (1 - 1e-6))[0])


def test_small_set_path_matches_index_path(tmp_path):
    data = clustered(300, SHAPE, seed=4)
    snap = make_db(tmp_path, data).snapshot()
    q = torch.from_numpy(data[:3].astype(np.float32)) + 0.5
    small, indexed = DatabaseShields(snap), DatabaseShields(snap, small_set_rows=0)
    assert not small.use_index and indexed.use_index
    for r in (1.0, 3.0, 6.0):
        assert np.array_equal(small.within_rows(q, r), indexed.within_rows(q, r))


def test_nearest_is_exact(tmp_path):
    data = clustered(900, SHAPE, seed=5)
    src = DatabaseShields(make_db(tmp_path, data).snapshot(), small_set_rows=0)
    q = torch.from_numpy(data[[1, 500, 7]].astype(np.float32)) + 0.7 * torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    _, d = brute_within(data, q, 0)
    dist, idx = src.nearest(q)
    assert idx.tolist() == d.argmin(1).tolist()
    assert torch.allclose(dist.double(), d.min(1).values, rtol=1e-6)


def test_projection_never_increases_distances():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((500, 256)) * np.geomspace(3, 0.01, 256)
    mu, a = fit_basis(x[:200], 16)
    assert np.linalg.norm(a, 2) <= 1.0
    f, _ = features(x, mu, a)
    i, j = rng.integers(0, 500, (2, 4000))
    true = np.linalg.norm(x[i] - x[j], axis=1)
    proj = np.linalg.norm(f[i].astype(np.float64) - f[j], axis=1)
    assert (proj <= true * (1 + 1e-5) + 1e-9).all()
    assert proj.mean() > 0.5 * true.mean()  # and is a useful bound


def test_incremental_add_and_remove(tmp_path):
    data = clustered(700, SHAPE, seed=7)
    db = make_db(tmp_path, data[:400], commit_rows=64)
    with db.writer() as w:
        w.add_batch([f"s{i}" for i in range(400, 700)], [f"{i:064x}" for i in range(400, 700)], data[400:])
    with db.writer() as w:
        for i in range(0, 700, 3):
            assert w.remove(f"s{i}")
    keep = np.array([i for i in range(700) if i % 3])
    src = DatabaseShields(db.snapshot(), small_set_rows=0)
    assert len(src) == len(keep)
    q = torch.from_numpy(data[[0, 3, 4, 650]].astype(np.float32)) + 0.2
    for r in (0.5, 3.0, 8.0):
        expect, _ = brute_within(data[keep], q, r)
        assert np.array_equal(src.within_rows(q, r), keep[expect])  # global rows: no compaction happened here
    assert src.sources([0, 1]) == ["s1", "s2"]
    # re-adding a removed content reuses its row: no new shard
    with db.writer() as w:
        assert w.row_of(f"{0:064x}") is not None
        w.link("again", f"{0:064x}", w.row_of(f"{0:064x}"))
    assert len(DatabaseShields(db.snapshot())) == len(keep) + 1


def test_compaction_drops_dead_rows_and_keeps_search_exact(tmp_path):
    data = clustered(3000, SHAPE, seed=8)
    db = make_db(tmp_path, data)
    with db.writer() as w:
        for i in range(0, 3000):
            if i % 10:
                w.remove(f"s{i}")
    snap = db.snapshot()
    keep = np.arange(0, 3000, 10)
    assert snap.rows == len(keep)  # compacted: dead rows are gone
    src = DatabaseShields(snap, small_set_rows=0)
    q = torch.from_numpy(data[[0, 10, 20]].astype(np.float32)) + 0.1
    expect, _ = brute_within(data[keep], q, 4.0)
    assert np.array_equal(src.within_rows(q, 4.0), expect)
    assert src.sources([1]) == ["s10"]


def test_many_small_commits_are_merged(tmp_path):
    data = clustered(1000, SHAPE, seed=9)
    db = make_db(tmp_path, data, commit_rows=50)
    snap = db.snapshot()
    assert len(snap.shards) == 1 and snap.rows == 1000
    assert np.array_equal(snap.read_rows(np.arange(1000)), data)


def test_bad_inputs_are_refused(tmp_path):
    db = make_db(tmp_path, clustered(10, SHAPE))
    with pytest.raises(ValueError, match="shape"):
        with db.writer() as w:
            w.add("x", "y" * 64, np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        with db.writer() as w:
            w.add("x", "y" * 64, np.full(SHAPE, np.nan))
    src = DatabaseShields(db.snapshot())
    with pytest.raises(ValueError, match="radius"):
        src.within(torch.zeros(1, *SHAPE), -1.0)
    with pytest.raises(ValueError, match="shape"):
        src.within(torch.zeros(1, 3, 8, 8), 1.0)
    with pytest.raises(ValueError, match="shape"):
        with db.writer(item_shape=(4, 4, 4)):
            pass
    assert len(DatabaseShields(db.snapshot())) == 10  # nothing lost


def test_thumbnails_are_stored_and_returned(tmp_path):
    db = ShieldDatabase(tmp_path / "t")
    with db.writer(item_shape=SHAPE, thumbnail_size=8) as w:
        for i in range(3):
            w.add(f"s{i}", f"{i:064x}", np.full(SHAPE, i, np.float32), np.full((8, 8, 3), 10 * i, np.uint8))
    src = DatabaseShields(db.snapshot())
    thumbs = src.thumbnails([2, 0])
    assert thumbs.dtype == torch.uint8 and thumbs.shape == (2, 8, 8, 3)
    assert thumbs[0].unique().tolist() == [20] and thumbs[1].unique().tolist() == [0]


def test_far_from_origin_queries_stay_exact(tmp_path):
    """The float32 screen works around the queries' mean: large common offsets must not cost exactness."""
    data = (clustered(800, SHAPE, seed=5).astype(np.float32) + 500.0).astype(np.float16)
    src = DatabaseShields(make_db(tmp_path, data).snapshot(), small_set_rows=0)
    q = torch.from_numpy(data[[3, 70, 400]].astype(np.float32))
    q[0, 2, 1, 1] += 4.0  # exactly 4.0 away from shield 3 (fp16 500-range values + 4 are exact in float32)
    _, dist = brute_within(data, q, 0)
    for radius in (4.0, float(dist.sort(1).values[:, 3].max())):
        assert np.array_equal(src.within_rows(q, radius), brute_within(data, q, radius)[0]), radius
    assert 3 in src.within_rows(q[:1], 4.0) and 3 not in src.within_rows(q[:1], 4.0 * (1 - 1e-6))


@pytest.mark.parametrize("rows", [[], [7], [0, 1, 2, 3], [5, 5, 9], list(range(0, 1200, 3)), list(range(1199, -1, -7))])
def test_scattered_reads_equal_the_stored_rows(tmp_path, rows):
    data = clustered(1200, SHAPE, seed=6)
    db = make_db(tmp_path, data, shard_rows=500)
    snap = db.snapshot()
    assert len(snap.shards) >= 2
    rows = np.array(rows, dtype=np.int64)
    assert np.array_equal(snap.read_rows(rows), data[rows])


def test_shard_truncated_after_opening_is_named(tmp_path):
    from shield_db.errors import CorruptDatabaseError
    data = clustered(300, SHAPE, seed=7)
    snap = make_db(tmp_path, data).snapshot()
    shard = snap.shards[0].path
    reader = snap.shards[0].latent_reader
    if reader is None or reader._fd is None:
        pytest.skip("positioned reads are not available on this platform (memory map fallback)")
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 4096)
    with pytest.raises(CorruptDatabaseError, match=shard.name):
        snap.read_rows(np.arange(snap.shards[0].rows - 10, snap.shards[0].rows))


def test_nearest_within_reach_is_exact_and_gives_up_beyond_it(tmp_path):
    """Near queries get the exact nearest; a query whose nearest shield lies beyond ``reach`` gets (inf, -1)
    after measuring only the shields the screen keeps within reach (not most of the set, as with no reach)."""
    data = clustered(900, SHAPE, seed=5)
    src = DatabaseShields(make_db(tmp_path, data, index_dim=8).snapshot(), small_set_rows=0)  # loose bounds
    q, d, nn, reach = near_and_far(data)
    measured = []
    exact_sq = src._exact_sq
    src._exact_sq = lambda qq, rows: (measured.append(len(rows)), exact_sq(qq, rows))[1]
    dist, idx = src.nearest(q, reach)
    assert idx[:2].tolist() == d[:2].argmin(1).tolist()
    assert torch.allclose(dist[:2].double(), nn[:2], rtol=1e-6)
    assert idx[2].item() == -1 and dist[2].item() == float("inf")
    measured.clear()
    src.nearest(q[2:], reach)
    with_reach = sum(measured)
    measured.clear()
    dist, idx = src.nearest(q[2:])                            # no reach: the exact nearest, at any distance
    assert idx.tolist() == [int(d[2].argmin())] and torch.allclose(dist.double(), nn[2:], rtol=1e-6)
    assert with_reach <= 16 < 300 < sum(measured), (with_reach, measured)  # probes only vs a third of the set
    dist, idx = src.nearest(q, float(nn[2]) * (1 + 1e-6))   # reach just beyond the far query's nearest: found
    assert idx.tolist() == d.argmin(1).tolist()
    small = DatabaseShields(src.snapshot)                    # below small_set_rows: measured in full, exact anyway
    assert not small.use_index and small.nearest(q, reach)[1].tolist() == d.argmin(1).tolist()


def test_per_query_radii_screen_the_union_of_single_query_screens(tmp_path):
    """The batched nearest search screens each query at its own bound: index and device screens take ``[B]`` radii."""
    data = clustered(900, SHAPE, seed=9)
    src = DatabaseShields(make_db(tmp_path, data).snapshot(), small_set_rows=0)
    q = torch.from_numpy(data[[3, 400, 800]].astype(np.float32)) + 0.4
    radii = np.array([1.0, 6.0, 12.0])
    q_np = q.numpy()
    single = [set(src._candidate_rows(q_np[b:b + 1], float(radii[b])).tolist()) for b in range(3)]
    assert set(src._candidate_rows(q_np, radii).tolist()) == set().union(*single)
    index = src.snapshot.index
    feats, norms = features(q_np, index.mu, index.a)
    screen = src.device_screen()
    one_by_one = [set(screen.candidates(torch.from_numpy(feats[b:b + 1]), torch.from_numpy(norms[b:b + 1]),
                                        float(radii[b])).tolist()) for b in range(3)]
    batched = screen.candidates(torch.from_numpy(feats), torch.from_numpy(norms), radii)
    assert set(batched.tolist()) == set().union(*one_by_one) and len(single[0]) < len(single[2])
