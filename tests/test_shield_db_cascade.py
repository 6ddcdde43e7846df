"""shield_db's cascade screen (shield_db/cascade.py): prefix maps never lengthen a distance, every folded pass keeps
every row within the radius against float64 brute force (random, clustered, rows exactly at the radius far from
the origin where float32 cancellation is large, duplicates, any number of queries), and the levels prune."""
import numpy as np
import pytest

from shield_db.cascade import Cascade, fold_queries, fold_rows, folded_pass, prefix_features, squared_norms
from shield_db.feature_index import FeatureIndex, screen_widths
from shield_db.projection import FEATURE_REL_ERROR, search_radius_sq


def radii_sq(q, rows, radius):
    """The squared radius the database would screen with, for features taken as exact (mu = 0)."""
    max_norm = float(np.linalg.norm(rows.astype(np.float64), axis=1).max())
    out = []
    for n in np.linalg.norm(q.astype(np.float64), axis=1):
        out.append(search_radius_sq(radius, float(n), max_norm, float((n * (1 + FEATURE_REL_ERROR)) ** 2),
                                    (max_norm * (1 + FEATURE_REL_ERROR)) ** 2, rows.shape[1]))
    return np.array(out)


def brute(q, rows, radius):
    d = np.sqrt(((q.astype(np.float64)[:, None] - rows.astype(np.float64)[None]) ** 2).sum(-1))
    return np.nonzero((d <= radius).any(0))[0], d


def clustered_features(n, width, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, width)) * 5
    scale = 1.0 / np.sqrt(1.0 + np.arange(width))  # decaying spectrum, like PCA features of images
    return (centres[rng.integers(0, 10, n)] * scale + 0.3 * rng.standard_normal((n, width)) * scale).astype(np.float32)


@pytest.mark.parametrize("m", [1, 8, 32, 100])
def test_prefix_features_never_lengthen_a_distance_and_keep_the_norm(m):
    rng = np.random.default_rng(m)
    f = rng.standard_normal((300, 129)).astype(np.float32) * rng.uniform(0.01, 10, (300, 1)).astype(np.float32)
    g = f[rng.permutation(300)]
    g[:100] = f[:100] + 1e-3 * rng.standard_normal((100, 129)).astype(np.float32)
    pf, pg = prefix_features(f, m).astype(np.float64), prefix_features(g, m).astype(np.float64)
    assert pf.shape == (300, m + 1)
    norms = np.linalg.norm(f.astype(np.float64), axis=1) + np.linalg.norm(g.astype(np.float64), axis=1)
    full = np.linalg.norm(f.astype(np.float64) - g.astype(np.float64), axis=1)
    assert (np.linalg.norm(pf - pg, axis=1) <= full + 2.0 ** -22 * norms).all()
    assert np.allclose(np.linalg.norm(pf, axis=1), np.linalg.norm(f.astype(np.float64), axis=1), rtol=1e-6)


@pytest.mark.parametrize("queries", [1, 3, 8, 11, 16])
def test_folded_pass_equals_float64_brute_force_for_any_batch_size(queries):
    rng = np.random.default_rng(queries)
    rows = clustered_features(6000, 65, seed=queries)
    q = rows[:queries] + 0.05 * rng.standard_normal((queries, 65)).astype(np.float32)
    _, d = brute(q, rows, 0)
    radius = float(np.sort(d, 1)[:, 40].max())
    expect, _ = brute(q, rows, radius)
    got = folded_pass(*fold_queries(q, radii_sq(q, rows, radius)), fold_rows(rows, squared_norms(rows)))
    assert set(expect.tolist()) <= set(got.tolist()) and np.array_equal(got, np.sort(got))
    assert set(got.tolist()) <= set(brute(q, rows, radius * 1.02)[0].tolist())  # it prunes, tightly


def test_rows_exactly_at_the_radius_far_from_the_origin_are_kept():
    """Norms ~1000 against a radius of 2: float32 cancellation in ||z||^2 - 2 q.z is ~0.1, so the bound must act."""
    rng = np.random.default_rng(3)
    width, radius = 65, 2.0
    q = np.round(1000 + 10 * rng.standard_normal((8, width))).astype(np.float32)
    at = np.repeat(q, width, 0)
    at[np.arange(len(at)), np.tile(np.arange(width), 8)] += np.float32(radius)  # exactly `radius` away, exactly stored
    outside = np.repeat(q, 4, 0) + np.float32(radius * 1.01) * np.eye(width, dtype=np.float32)[rng.integers(0, width, 32)]
    rows = np.concatenate([at, at[:20], outside, np.round(1000 + 10 * rng.standard_normal((500, width)))]).astype(np.float32)
    expect, d = brute(q, rows, radius)
    assert len(expect) >= len(at) + 20 and (np.abs(d.min(0)[:len(at)] - radius) == 0).all()
    rows_aug = fold_rows(rows, squared_norms(rows))
    got = folded_pass(*fold_queries(q, radii_sq(q, rows, radius)), rows_aug)
    assert set(expect.tolist()) <= set(got.tolist())
    naive = folded_pass(*fold_queries(q, np.full(8, radius * radius)), rows_aug)  # without the rounding bound
    assert not set(expect.tolist()) <= set(naive.tolist()), "the test lost its teeth: no rounding to cover"


@pytest.mark.parametrize("widths", [(), (8,), (8, 24), (16, 32, 48)])
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_cascade_equals_brute_force_and_prunes(widths, kind):
    rng = np.random.default_rng(len(widths))
    rows = (rng.standard_normal((5000, 65)).astype(np.float32) if kind == "random"
            else clustered_features(5000, 65, seed=7))
    rows = np.concatenate([rows, np.repeat(rows[[5]], 4, 0)])  # duplicates
    cascade = Cascade(rows, widths)
    q = rows[[5, 9, 11]] + 0.02 * rng.standard_normal((3, 65)).astype(np.float32)
    _, d = brute(q, rows, 0)
    for k in (1, 5, 60):
        radius = float(np.sort(d, 1)[:, k - 1].max())
        expect, _ = brute(q, rows, radius)
        got = cascade.candidates(q, radii_sq(q, rows, radius))
        assert set(expect.tolist()) <= set(got.tolist()), (widths, k)
        assert set(got.tolist()) <= set(brute(q, rows, radius * 1.02)[0].tolist())
        assert {5, *range(5000, 5004)} <= set(got.tolist())


def test_cascade_of_no_rows_and_bad_widths():
    empty = Cascade(np.zeros((0, 65), np.float32), (8, 24))
    assert len(empty.candidates(np.ones((2, 65), np.float32), np.array([1.0, 1.0]))) == 0
    for bad in [(0,), (64,), (24, 8), (8, 8)]:
        with pytest.raises(ValueError, match="prefix widths"):
            Cascade(np.zeros((10, 65), np.float32), bad)


def test_screen_widths_per_stored_feature_width():
    assert screen_widths(9) == () and screen_widths(41) == ()
    assert screen_widths(65) == (32,) and screen_widths(129) == (32,)   # 64 directions, 128 (the default)
    assert screen_widths(257) == (32, 128)
    assert screen_widths(513) == (32, 128)


def test_feature_index_rebuilds_its_cascade_after_rows_are_added():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 300)).astype(np.float32)
    mu, a = np.zeros(300), np.linalg.qr(rng.standard_normal((300, 140)))[0]
    index = FeatureIndex.empty(mu, a)
    index.add(x[:2000])
    assert index.cascade().widths == (32,) and len(index.cascade().first) == 2000
    index.add(x[2000:])
    q = x[[2500, 10]] + np.float32(0.01)
    d = np.sqrt(((q.astype(np.float64)[:, None] - x.astype(np.float64)[None]) ** 2).sum(-1))
    radius = float(np.sort(d, 1)[:, 3].max())
    assert set(np.nonzero((d <= radius).any(0))[0].tolist()) <= set(index.candidates(q, radius).tolist())
    assert len(index.cascade().first) == 3000


def test_search_radius_sq_over_arrays_equals_one_call_per_query():
    """The database screens a batch with one elementwise call; each value equals the scalar call's, bit for bit."""
    rng = np.random.default_rng(3)
    for scale in (1e-3, 1.0, 1e3):
        radius, norms = rng.uniform(0, 50, 8) * scale, rng.uniform(0, 80, 8) * scale
        max_norm = float(rng.uniform(0, 100)) * scale
        max_sq = (max_norm * (1 + FEATURE_REL_ERROR)) ** 2
        batch = search_radius_sq(radius, norms, max_norm, (norms * (1 + FEATURE_REL_ERROR)) ** 2, max_sq, 129)
        one = [search_radius_sq(float(r), float(n), max_norm, float((n * (1 + FEATURE_REL_ERROR)) ** 2), max_sq, 129)
               for r, n in zip(radius, norms)]
        assert batch.dtype == np.float32 and batch.astype(np.float64).tolist() == one
