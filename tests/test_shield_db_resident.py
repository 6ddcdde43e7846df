"""shield_db.resident: a set's latents held in RAM up to a budget give the same answers as reads from the shards,
hold the bytes the snapshot verified, and the budget is read from the environment with a clear error."""
import logging
import threading

import numpy as np
import pytest
import torch

import shield_db.snapshot
from shield_db.errors import CorruptDatabaseError

from shield_db.resident import DEFAULT_RESIDENT_MB, RESIDENT_MB_ENV, ResidentRows, resident_budget
from shield_db.source import DatabaseShields
from shield_data import brute_within, clustered, make_db, near_and_far

SHAPE = (4, 8, 8)


def held(source):
    assert source.snapshot.wait_held(timeout=60)
    return [isinstance(s.latent_reader, ResidentRows) for s in source.snapshot.shards]


def test_held_set_answers_like_the_shards(tmp_path):
    data = clustered(5000, SHAPE, seed=3)
    db = make_db(tmp_path, data, shard_rows=2000)
    on_disk = DatabaseShields(db.snapshot(), resident_bytes=0)
    in_ram = DatabaseShields(db.snapshot())
    shards = len(in_ram.snapshot.shards)
    assert shards >= 2 and held(on_disk) == [False] * shards and held(in_ram) == [True] * shards
    assert in_ram.use_index
    q, dist, nn, reach = near_and_far(data)
    for radius in (0.5 * float(nn[:2].max()), float(dist.sort(1).values[:, 5].max())):
        truth = brute_within(data, q, radius)[0]
        assert np.array_equal(in_ram.within_rows(q, radius), truth)
        assert np.array_equal(on_disk.within_rows(q, radius), truth)
    for a, b in zip(in_ram.nearest(q, reach), on_disk.nearest(q, reach)):
        assert torch.equal(a, b)
    rows = np.array([0, 1999, 2000, 4999, 17])
    assert np.array_equal(in_ram.snapshot.read_rows(rows), data[rows])


def test_budget_holds_whole_shards_in_order(tmp_path):
    data = clustered(5000, SHAPE, seed=4)
    db = make_db(tmp_path, data, shard_rows=2000)
    sizes = [s.rows * data[0].nbytes for s in db.snapshot().shards]
    assert len(sizes) >= 3
    source = DatabaseShields(db.snapshot(), resident_bytes=sizes[0] + sizes[1] + sizes[2] // 2)
    assert held(source) == [True, True] + [False] * (len(sizes) - 2)
    assert np.array_equal(source.snapshot.read_rows(np.arange(5000)), data)


def test_held_rows_are_the_verified_bytes_and_cannot_be_written(tmp_path):
    """A shard changed after the set was opened does not reach a held copy (the loader reloads a changed set);
    callers get fresh arrays, never a view they could write through."""
    data = clustered(300, SHAPE, seed=5)
    source = DatabaseShields(make_db(tmp_path, data).snapshot())
    assert all(held(source))
    shard = source.snapshot.shards[-1].path   # holds the last rows
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 4096)
    rows = source.snapshot.read_rows(np.arange(290, 300))
    assert np.array_equal(rows, data[290:300])
    rows[:] = 0
    assert np.array_equal(source.snapshot.read_rows(np.arange(290, 300)), data[290:300])
    with pytest.raises(ValueError):
        source.snapshot.shards[-1].latent_reader.array[0] = 0


@pytest.mark.parametrize("text, expected", [("", DEFAULT_RESIDENT_MB << 20), ("0", 0), (" 2.5 ", int(2.5 * 2**20))])
def test_budget_from_the_environment(monkeypatch, text, expected):
    monkeypatch.setenv(RESIDENT_MB_ENV, text)
    assert resident_budget() == expected


@pytest.mark.parametrize("text", ["-1", "lots", "nan"])
def test_bad_budget_names_the_variable_and_the_fix(tmp_path, monkeypatch, text):
    monkeypatch.setenv(RESIDENT_MB_ENV, text)
    db = make_db(tmp_path, clustered(50, SHAPE, seed=6))
    with pytest.raises(ValueError, match=f"{RESIDENT_MB_ENV}=.*MB >= 0.*unset it"):
        DatabaseShields(db.snapshot())


def test_searches_read_the_shards_until_the_background_copy_is_complete(tmp_path, monkeypatch):
    data = clustered(5000, SHAPE, seed=7)
    db = make_db(tmp_path, data, shard_rows=2000)
    release, started = threading.Event(), threading.Event()

    class SlowCopy(ResidentRows):
        def __init__(self, reader):
            started.set()
            assert release.wait(60)
            super().__init__(reader)

    monkeypatch.setattr(shield_db.snapshot, "ResidentRows", SlowCopy)
    source = DatabaseShields(db.snapshot())   # returns while the copy waits
    assert started.wait(60) and not source.snapshot.wait_held(timeout=0)
    q, dist, _, _ = near_and_far(data)
    radius = float(dist.sort(1).values[:, 5].max())
    truth = brute_within(data, q, radius)[0]
    assert np.array_equal(source.within_rows(q, radius), truth)
    assert not any(isinstance(s.latent_reader, ResidentRows) for s in source.snapshot.shards)
    release.set()
    assert source.snapshot.wait_held(timeout=60)
    assert all(isinstance(s.latent_reader, SlowCopy) for s in source.snapshot.shards)
    assert np.array_equal(source.within_rows(q, radius), truth)


def test_a_copy_that_fails_leaves_the_shards_read_and_their_errors_reported(tmp_path, monkeypatch, caplog):
    """A shard that cannot be read whole stays on disk: the failure is logged, and a search that needs its rows
    raises the shard's error (never "no hits")."""
    data = clustered(300, SHAPE, seed=8)
    db = make_db(tmp_path, data)
    snap = db.snapshot()
    shard = snap.shards[-1].path   # holds the last rows
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 4096)
    with caplog.at_level(logging.WARNING, logger="shielded_sampling"):
        source = DatabaseShields(snap)
        assert source.snapshot.wait_held(timeout=60)
    assert "latents not held in RAM" in caplog.text and shard.name in caplog.text
    assert not isinstance(snap.shards[-1].latent_reader, ResidentRows)
    with pytest.raises(CorruptDatabaseError, match=shard.name):
        source.within_rows(torch.from_numpy(data[290:292].astype(np.float32)), 1.0)
