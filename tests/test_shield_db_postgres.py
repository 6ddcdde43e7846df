"""PostgreSQL shield source: exact range/nearest search vs float64 brute force, sharded by postgres_fdw, fail-closed
on a shard down, one snapshot per run, the file database's item semantics."""
import itertools

import numpy as np
import pytest
import torch
from pg_servers import Servers, require_postgres
from shield_data import brute_within, clustered, near_and_far

require_postgres()

from shield_db.postgres.errors import ShieldQueryError  # noqa: E402
from shield_db.postgres.store import PostgresShieldStore  # noqa: E402

SHAPE = (4, 8, 8)
NAMES = (f"t{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def servers():
    s = Servers()
    yield s
    s.close()


@pytest.fixture(scope="module")
def server(servers):
    return servers.new()


def make_store(dsn, data, shards=(None,), commit_rows=256):
    store = PostgresShieldStore(dsn, next(NAMES))
    store.create(data.shape[1:], shards=shards)
    with store.writer() as w:
        w.commit_rows = commit_rows
        w.add_batch([f"s{i}" for i in range(len(data))], [f"{i:064x}" for i in range(len(data))], data)
    return store


def check_radii(src, data, queries):
    _, dist = brute_within(data, queries, 0)
    for k in (1, 2, 5, 40):
        radius = float(dist.sort(1).values[:, k - 1].max())
        expect, _ = brute_within(data, queries, radius)
        assert np.array_equal(src.within_rows(queries, radius), expect), k
        found = src.within(queries, radius)
        assert torch.equal(found, torch.from_numpy(data[expect].astype(np.float32)))


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_range_search_equals_brute_force(server, kind):
    data = (np.random.default_rng(1).standard_normal((1500, *SHAPE)) if kind == "random" else clustered(1500, SHAPE))
    data = data.astype(np.float16)
    src = make_store(server.dsn(), data).source()
    assert len(src) == 1500 and len(src.cell_ids) > 1
    queries = torch.from_numpy(data[:6].astype(np.float32)) + 0.3 * torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(2))
    check_radii(src, data, queries)
    if kind == "clustered":  # the cells really prune: a small radius touches few of them
        _, dist = brute_within(data, queries[:1], 0)
        rho = src._rho(queries[:1].numpy().reshape(1, -1), float(dist.min()))
        from shield_db.postgres.cells import touched_cells
        from shield_db.projection import features
        fq, _ = features(queries[:1].numpy().reshape(1, -1), *src.basis)
        assert touched_cells(fq, rho, src.centres, src.radii).sum() < len(src.cell_ids) / 2


def test_points_exactly_at_radius_and_duplicates(server):
    data = clustered(600, SHAPE, seed=3)
    data[100:110] = data[10]  # duplicates: ten rows with the same latent (different content hashes)
    src = make_store(server.dsn(), data).source()
    q = torch.from_numpy(data[[10, 20]].astype(np.float32))
    q[0, 1, 2, 3] += 2.0  # exactly 2.0 from shield 10 (fp16 + 2 is exact in float32)
    q[1, 0, 0, 0] -= 2.0
    exact = ((q.double() - torch.from_numpy(data[[10, 20]].astype(np.float64))) ** 2).sum((1, 2, 3)).sqrt()
    assert exact.tolist() == [2.0, 2.0]
    rows = src.within_rows(q, 2.0)
    expect, _ = brute_within(data, q, 2.0)
    assert np.array_equal(rows, expect) and {10, 20, *range(100, 110)} <= set(rows.tolist())
    just_inside = src.within_rows(q[:1], 2.0 * (1 - 1e-6))
    assert 10 not in just_inside
    assert np.array_equal(just_inside, brute_within(data, q[:1], 2.0 * (1 - 1e-6))[0])


def test_nearest_is_exact(server):
    data = clustered(900, SHAPE, seed=5)
    src = make_store(server.dsn(), data).source()
    q = torch.from_numpy(data[[1, 500, 7]].astype(np.float32)) + 0.7 * torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    _, d = brute_within(data, q, 0)
    dist, idx = src.nearest(q)
    assert idx.tolist() == d.argmin(1).tolist()
    assert torch.allclose(dist.double(), d.min(1).values, rtol=1e-6)
    assert torch.equal(src.latents(idx), torch.from_numpy(data[idx.numpy()].astype(np.float32)))
    assert src.sources(idx) == [f"s{i}" for i in idx.tolist()]


def test_nearest_within_reach_is_exact_and_none_beyond(server):
    data = clustered(900, SHAPE, seed=5)
    src = make_store(server.dsn(), data).source()
    q, d, nn, reach = near_and_far(data)
    dist, idx = src.nearest(q, reach)
    assert idx.tolist() == d[:2].argmin(1).tolist() + [-1]
    assert torch.allclose(dist[:2].double(), nn[:2], rtol=1e-6) and dist[2].item() == float("inf")
    assert src.nearest(q[2:], float(nn[2]) * (1 + 1e-6))[1].tolist() == [int(d[2].argmin())]


def test_incremental_commits_refit_and_removal(server):
    """Many small commits (basis fitted on the first, refitted as the set grows), removals and relinks by hash."""
    data = clustered(800, SHAPE, seed=7)
    store = make_store(server.dsn(), data[:50], commit_rows=16)
    with store.writer() as w:
        w.commit_rows = 64
        w.add_batch([f"s{i}" for i in range(50, 800)], [f"{i:064x}" for i in range(50, 800)], data[50:])
        assert w.refit_owed()
    with store.writer() as w:
        assert not w.refit_owed() and int(w.body["fitted_rows"]) == 800
        for i in range(0, 800, 3):
            assert w.remove(f"s{i}")
        w.link("again", f"{3:064x}", w.row_of(f"{3:064x}"))  # content of a removed file, new name: row reused
    keep = np.array([i for i in range(800) if i % 3 or i == 3])
    src = store.source()
    assert len(src) == len(keep) and src.sources([list(src.rows).index(3)]) == ["again"]
    q = torch.from_numpy(data[[3, 4, 400]].astype(np.float32)) + 0.4
    _, dist = brute_within(data[keep], q, 0)
    for k in (1, 3, 20):
        r = float(dist.sort(1).values[:, k - 1].max())
        assert np.array_equal(src.within_rows(q, r), keep[brute_within(data[keep], q, r)[0]])
    near_removed = torch.from_numpy(data[[6, 9]].astype(np.float32)) + 0.01  # rows 6, 9 are dead: never returned
    _, d = brute_within(data[keep], near_removed, 0)
    assert np.array_equal(src.rows, keep) and src.nearest(near_removed)[1].tolist() == d.argmin(1).tolist()


def test_sharded_across_servers_is_exact_and_pushes_the_filter_down(servers, server):
    shards = [servers.new(), servers.new()]
    data = clustered(1200, SHAPE, seed=11)
    store = make_store(server.dsn(), data, shards=[None, shards[0].dsn(), shards[1].dsn()])
    src = store.source()
    import psycopg
    with psycopg.connect(server.dsn()) as c:
        cell_part = dict(c.execute(f"SELECT cell, part FROM {store.schema}.cells").fetchall())
        blobs = c.execute(f"SELECT cell, count(*) FROM {store.schema}.blobs GROUP BY cell").fetchall()
    for part, shard in enumerate(shards, start=1):  # the rows of a cell live on its partition's server
        with psycopg.connect(shard.dsn()) as c:
            n = c.execute(f"SELECT count(*) FROM {store.schema}.shields_p{part}").fetchone()[0]
        assert n > 0 and n == sum(count for cell, count in blobs if cell_part[cell] == part)
    queries = torch.from_numpy(data[[0, 600, 1100]].astype(np.float32)) + 0.3
    check_radii(src, data, queries)
    plan = "\n".join(r[0] for r in src.conn.execute(
        f"EXPLAIN VERBOSE SELECT row FROM {store.schema}.shields WHERE part = ANY(%s) AND "
        f"cube_distance(feature, cube(%s::float8[])) <= 1", [[1, 2], [0.0] * 65]).fetchall())
    assert "Async Foreign Scan" in plan and "cube_distance" in plan.split("Remote SQL")[1]
    # A commit landing after the coordinator's snapshot but before a shard's is detected (the shards' stamps)
    late = store.source()
    late.conn.rollback()
    late.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    late._load()  # the coordinator's snapshot only: no shard touched yet
    with store.writer() as w:
        w.reindex()
    assert not late.shards_match()
    assert store.source().shards_match()


def test_shard_down_is_an_error_never_no_hits(servers, server):
    shard = servers.new()
    data = clustered(600, SHAPE, seed=13)
    store = make_store(server.dsn(), data, shards=[None, shard.dsn()])
    src = store.source()
    q = torch.from_numpy(data[:8].astype(np.float32))
    everywhere = 1e4  # every cell, so both partitions are scanned
    assert len(src.within_rows(q, everywhere)) == 600
    shard.stop(mode="immediate")
    with pytest.raises(ShieldQueryError, match="shield search failed"):
        src.within_rows(q, everywhere)
    with pytest.raises(ShieldQueryError):  # the failed transaction stays failed: no later call returns "nothing"
        src.within_rows(q, 0.0)
    with pytest.raises(ShieldQueryError):
        store.source().within_rows(q, everywhere)


def test_a_run_sees_one_snapshot(server):
    data = clustered(400, SHAPE, seed=17)
    store = make_store(server.dsn(), data[:200])
    src = store.source()
    q = torch.from_numpy(data[250:252].astype(np.float32))
    before = src.within_rows(q, 1e-3)
    assert len(before) == 0
    with store.writer() as w:  # another process adds the very shields the queries sit on, and removes s0
        w.add_batch([f"s{i}" for i in range(200, 400)], [f"{i:064x}" for i in range(200, 400)], data[200:])
        w.remove("s0")
    assert len(src) == 200 and np.array_equal(src.within_rows(q, 1e-3), before)
    assert np.array_equal(src.within_rows(torch.from_numpy(data[:1].astype(np.float32)), 0.0), [0])
    fresh = store.source()
    assert len(fresh) == 399 and np.array_equal(fresh.within_rows(q, 1e-3), [250, 251])


def test_bad_inputs_are_refused(server):
    src = make_store(server.dsn(), clustered(50, SHAPE, seed=19)).source()
    with pytest.raises(ValueError, match="radius"):
        src.within_rows(torch.zeros(1, *SHAPE), -1.0)
    with pytest.raises(ValueError, match="do not match"):
        src.within_rows(torch.zeros(1, 3, 8, 8), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        src.within_rows(torch.full((1, *SHAPE), float("nan")), 1.0)
    with pytest.raises(ValueError, match="schema name"):
        PostgresShieldStore(server.dsn(), "Robert'); DROP TABLE x;--")


def test_pgvector_features_on_pgserver_are_exact():
    """The managed-Postgres path: features in pgvector's vector(65) (float32 sums, a wider SQL bound), here on the
    PostgreSQL 16 + pgvector that the PyPI package pgserver bundles."""
    from shield_db.postgres.server import pgserver_bin_dir
    bin_dir = pgserver_bin_dir()
    if bin_dir is None:
        pytest.skip("pgserver not installed (pip install pgserver): the pgvector path is not exercised")
    s = Servers()
    try:
        s.make = lambda folder, port: __import__("shield_db.postgres.server", fromlist=["x"]).EmbeddedServer(
            folder, port=port, bin_dir=bin_dir)
        server = s.new()
        data = clustered(900, SHAPE, seed=23)
        data[300:305] = data[30]
        store = make_store(server.dsn(), data)
        src = store.source()
        assert src.feature_type == "vector"
        queries = torch.from_numpy(data[[30, 400, 800]].astype(np.float32)) + 0.3
        check_radii(src, data, queries)
        q = torch.from_numpy(data[[30]].astype(np.float32))
        q[0, 2, 3, 4] += 2.0
        assert np.array_equal(src.within_rows(q, 2.0), brute_within(data, q, 2.0)[0])
        _, d = brute_within(data, queries, 0)
        assert src.nearest(queries)[1].tolist() == d.argmin(1).tolist()
    finally:
        s.close()


def test_queries_from_an_accelerator_are_checked_there_with_the_cpu_answers(server):
    """The candidates fetched from PostgreSQL are checked on the queries' device (tests/fake_accelerator.py stands
    in for MPS: no float64 there, no mixed devices) and give the CPU's rows and latents."""
    from fake_accelerator import OnAccelerator, fake_accelerator, to_device
    data = clustered(600, SHAPE).astype(np.float16)
    src = make_store(server.dsn(), data).source()
    queries = torch.from_numpy(data[:4].astype(np.float32)) + 0.3
    _, dist = brute_within(data, queries, 0)
    radius = float(dist.sort(1).values[:, 4].max())
    with fake_accelerator():
        rows = src.within_rows(to_device(queries), radius)
        found = src.within(to_device(queries), radius)
        _, nearest = src.nearest(to_device(queries), reach=radius)
    expect, _ = brute_within(data, queries, radius)
    assert torch.equal(nearest.cpu(), src.nearest(queries, reach=radius)[1])
    assert np.array_equal(rows, expect) and np.array_equal(rows, src.within_rows(queries, radius))
    assert isinstance(found, OnAccelerator) and torch.equal(found.cpu(), src.within(queries, radius))
