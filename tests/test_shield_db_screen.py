"""shield_db's two-pass feature screen: exact against float64 brute force (random, clustered, at the radius,
duplicates), the coarse map never lengthens a distance, and databases indexed with another basis size still work."""
import numpy as np
import pytest
import torch
from shield_data import brute_within, clustered, make_db

from shield_db import manifest
from shield_db.cascade import fold_queries, fold_rows, folded_pass, prefix_features, squared_norms
from shield_db.feature_index import PREFIX_WIDTHS
from shield_db.source import DatabaseShields

SHAPE = (4, 8, 16)  # 512 dims: 256 directions are a real projection
COARSE_DIM = PREFIX_WIDTHS[0]  # the cascade's first level


def real_like(n, seed=0):
    """Image-like rows: a slowly decaying spectrum (most energy outside any 32 leading directions)."""
    rng = np.random.default_rng(seed)
    dim = int(np.prod(SHAPE))
    scale = 1.0 / np.sqrt(1.0 + np.arange(dim))
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    return ((rng.standard_normal((n, dim)) * scale) @ basis.T * 4).reshape(n, *SHAPE).astype(np.float16)


def test_coarse_features_never_lengthen_a_distance():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((400, 129)).astype(np.float32) * rng.uniform(0.01, 10, (400, 1)).astype(np.float32)
    g = f[rng.permutation(400)]
    g[:100] = f[:100] + 1e-3 * rng.standard_normal((100, 129)).astype(np.float32)  # near pairs too
    c_f, c_g = prefix_features(f, COARSE_DIM).astype(np.float64), prefix_features(g, COARSE_DIM).astype(np.float64)
    assert c_f.shape == (400, COARSE_DIM + 1)
    coarse = np.linalg.norm(c_f - c_g, axis=1)
    full = np.linalg.norm(f.astype(np.float64) - g.astype(np.float64), axis=1)
    norms = np.linalg.norm(f.astype(np.float64), axis=1) + np.linalg.norm(g.astype(np.float64), axis=1)
    assert (coarse <= full + 2.0 ** -22 * norms).all()  # rounding of the coarse map: 2^-23 ||f|| each
    assert np.allclose(np.linalg.norm(c_f, axis=1), np.linalg.norm(f.astype(np.float64), axis=1), rtol=1e-6)


def test_screen_keeps_every_row_within_the_radius_in_float64():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((5000, 33)).astype(np.float32)
    q = rows[:8] + 0.1 * rng.standard_normal((8, 33)).astype(np.float32)
    exact = np.sqrt(((q.astype(np.float64)[:, None] - rows.astype(np.float64)[None]) ** 2).sum(-1))
    r2 = float(np.sort(exact, 1)[:, 30].max()) ** 2
    got = folded_pass(*fold_queries(q, np.full(8, r2 * (1 + 1e-5))), fold_rows(rows, squared_norms(rows)))
    expect = np.nonzero((exact ** 2 <= r2).any(0))[0]
    assert set(expect) <= set(got) and len(got) < len(rows)
    assert np.array_equal(got, np.sort(got))


@pytest.mark.parametrize("index_dim", [8, 128, 256])  # cascade of 1, 2 and 3 passes (9, 129, 257 features)
@pytest.mark.parametrize("kind", ["random", "clustered", "real_like"])
def test_range_search_equals_brute_force(tmp_path, kind, index_dim):
    data = {"random": lambda: np.random.default_rng(1).standard_normal((2000, *SHAPE)).astype(np.float16),
            "clustered": lambda: clustered(2000, SHAPE), "real_like": lambda: real_like(2000)}[kind]()
    src = DatabaseShields(make_db(tmp_path, data, index_dim=index_dim).snapshot(), small_set_rows=0)
    index = src.snapshot.index
    assert index.a.shape[1] == index_dim and index.cascade().widths == {8: (), 128: (32,), 256: (32, 128)}[index_dim]
    gen = torch.Generator().manual_seed(2)
    queries = torch.from_numpy(data[:8].astype(np.float32)) + 0.05 * torch.randn(8, *SHAPE, generator=gen)
    _, dist = brute_within(data, queries, 0)
    pruned = 0
    for k in (1, 2, 5, 40, 400):
        radius = float(dist.sort(1).values[:, k - 1].max())
        expect, _ = brute_within(data, queries, radius)
        assert np.array_equal(src.within_rows(queries, radius), expect), (kind, k)
        cand = index.candidates(queries.numpy().reshape(8, -1), radius)
        assert set(expect.tolist()) <= set(cand.tolist())
        pruned = max(pruned, len(data) - len(cand))
    assert pruned > 0


@pytest.mark.parametrize("index_dim", [128, 256])
def test_points_exactly_at_the_radius_and_duplicates(tmp_path, index_dim):
    base = real_like(1500, seed=5)
    data = np.concatenate([base, np.repeat(base[[7]], 6, 0), np.repeat(base[[9]], 3, 0)])  # rows 1500-1508 duplicate
    src = DatabaseShields(make_db(tmp_path, data, index_dim=index_dim).snapshot(), small_set_rows=0)
    assert src.snapshot.index.cascade().widths
    q = torch.from_numpy(data[[7, 9]].astype(np.float32))
    q[0, 1, 2, 3] += 2.0  # exactly 2.0 from shield 7 and its 6 copies (fp16 + 2 is exact in float32)
    q[1, 3, 7, 0] -= 2.0
    exact = ((q.double() - torch.from_numpy(data[[7, 9]].astype(np.float64))) ** 2).sum((1, 2, 3)).sqrt()
    assert exact.tolist() == [2.0, 2.0]
    rows = src.within_rows(q, 2.0)
    assert {7, 9, *range(1500, 1509)} <= set(rows.tolist())
    assert np.array_equal(rows, brute_within(data, q, 2.0)[0])
    inside = src.within_rows(q[:1], 2.0 * (1 - 1e-6))
    assert 7 not in inside and np.array_equal(inside, brute_within(data, q[:1], 2.0 * (1 - 1e-6))[0])


@pytest.mark.parametrize("old_dim", [16, 64, 256])  # 64: the default of the release before the previous one
def test_database_indexed_with_another_basis_size_is_searched_then_refitted(tmp_path, old_dim):
    """Old databases open as they are (exact with their own basis); the next write refits the default."""
    data = real_like(1200, seed=6)
    db = make_db(tmp_path, data, index_dim=old_dim)  # as an older release (another default) left it
    q = torch.from_numpy(data[:4].astype(np.float32)) + 0.05
    radius = float(brute_within(data, q, 0)[1].sort(1).values[:, 4].max())
    old = DatabaseShields(db.snapshot(), small_set_rows=0)
    assert old.snapshot.index.a.shape[1] == old_dim
    assert old.snapshot.index.cascade().widths == {16: (), 64: (32,), 256: (32, 128)}[old_dim]
    assert np.array_equal(old.within_rows(q, radius), brute_within(data, q, radius)[0])
    old_files = set(manifest.load(db.folder)["index"][key]["file"] for key in ("basis", "faiss"))
    with db.writer() as txn:  # the next write, with today's default
        txn.add_batch(["extra"], ["f" * 64], data[:1] + np.float16(0.5))
    entry = manifest.load(db.folder)["index"]
    assert entry["dim"] == 128 and not old_files & {entry[key]["file"] for key in ("basis", "faiss")}
    assert all(not (db.folder / f).exists() for f in old_files)
    new = DatabaseShields(db.snapshot(), small_set_rows=0)  # opening checks the new files against the manifest
    assert new.snapshot.index.a.shape[1] == 128 and new.snapshot.index.rows == 1201
    assert new.snapshot.index.cascade().widths == (32,)
    both = np.concatenate([data, data[:1] + np.float16(0.5)])
    assert np.array_equal(new.within_rows(q, radius), brute_within(both, q, radius)[0])


def test_a_chosen_number_of_directions_is_kept_by_later_writes(tmp_path):
    """``writer(index_dim=256)`` (CLI ``reindex --index-dim 256``) refits and stores the choice: a later default writer
    (a Shield Set Loader sync) keeps 256 without refitting; choosing 128 again switches back. Exact throughout."""
    data = real_like(1200, seed=8)
    db = make_db(tmp_path, data)
    assert manifest.load(db.folder)["index"]["dim"] == 128 and "index_dim" not in manifest.load(db.folder)
    with db.writer(index_dim=256):
        pass
    body = manifest.load(db.folder)
    assert body["index"]["dim"] == 256 and body["index_dim"] == 256
    files = {body["index"][key]["file"] for key in ("basis", "faiss")}
    with db.writer():  # an empty default write changes nothing
        pass
    assert {manifest.load(db.folder)["index"][key]["file"] for key in ("basis", "faiss")} == files
    with db.writer() as txn:  # new rows are added with the chosen basis
        txn.add_batch(["extra"], ["e" * 64], data[:1] + np.float16(0.5))
    body = manifest.load(db.folder)
    assert body["index"]["dim"] == 256 and body["index"]["rows"] == 1201 and body["index_dim"] == 256
    both = np.concatenate([data, data[:1] + np.float16(0.5)])
    q = torch.from_numpy(data[:4].astype(np.float32)) + 0.05
    radius = float(brute_within(both, q, 0)[1].sort(1).values[:, 4].max())
    src = DatabaseShields(db.snapshot(), small_set_rows=0)
    assert src.snapshot.index.cascade().widths == (32, 128)
    assert np.array_equal(src.within_rows(q, radius), brute_within(both, q, radius)[0])
    with db.writer(index_dim=128):
        pass
    assert manifest.load(db.folder)["index"]["dim"] == 128 and manifest.load(db.folder)["index_dim"] == 128


@pytest.mark.parametrize("bad", [0, 7, 1025, 12.5, True, "256"])
def test_an_impossible_number_of_directions_is_refused_before_anything_changes(tmp_path, bad):
    db = make_db(tmp_path, real_like(50, seed=9))
    before = (db.folder / manifest.MANIFEST_NAME).read_bytes()
    with pytest.raises(ValueError, match=r"index_dim .* whole number in \[8, 1024\]"):
        with db.writer(index_dim=bad):
            pass
    assert (db.folder / manifest.MANIFEST_NAME).read_bytes() == before


def test_cli_reindex_refits_every_database_of_an_image_folder_and_reports_it(tmp_path, capsys):
    from shield_db.cli import main
    from shield_db.folder import CACHE_DIR
    for name, seed in (("a", 10), ("b", 11)):
        make_db(tmp_path / "images" / CACHE_DIR, real_like(600, seed=seed), name=name)
    assert main(["reindex", str(tmp_path / "images"), "--index-dim", "64"]) == 0
    for name in ("a", "b"):
        body = manifest.load(tmp_path / "images" / CACHE_DIR / name)
        assert body["index"]["dim"] == 64 and body["index_dim"] == 64
    assert capsys.readouterr().out.count("indexed with 64 directions") == 2   # the CLI logs to stdout / stderr
    assert main(["reindex", str(tmp_path / "images"), "--index-dim", "5000"]) == 2
    assert "--index-dim" in capsys.readouterr().err
