"""Every shield source implements guidance.shields.ShieldSource, and its methods give what the class switches
in nodes/spell_hook.py and guidance/shields.py gave before (expected values computed directly here)."""
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from guidance import history
from guidance.shield_resample import all_latents, resample_latents
from guidance.shield_views import AffineShields, ConcatShields, ExcludedShields, model_space
from guidance.shields import NOT_MAPPABLE, ShieldSource, TensorShields
from shield_db.database import ShieldDatabase
from shield_db.postgres.source import PostgresShields
from shield_db.source import DatabaseShields

SHAPE = (2, 4, 4)
ROOT = Path(__file__).resolve().parents[1]
SOURCE_CLASSES = (TensorShields, AffineShields, ConcatShields, ExcludedShields, DatabaseShields, PostgresShields)


def protocol_methods() -> dict:
    return {name: fn for name, fn in vars(ShieldSource).items()
            if inspect.isfunction(fn) and (not name.startswith("_") or name == "__len__")}


def params(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()][1:]


def latents(n: int, seed: int) -> torch.Tensor:
    """Values exact in fp16, so a database (which stores fp16) holds exactly these."""
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed)).half().float()


def database(tmp_path, data: torch.Tensor) -> DatabaseShields:
    db = ShieldDatabase(tmp_path / "db")
    with db.writer(item_shape=SHAPE) as w:
        w.add_batch([f"s{i}" for i in range(len(data))], [f"{i:064x}" for i in range(len(data))],
                    data.numpy().astype(np.float16))
    return DatabaseShields(db.snapshot())


def brute_within(z: torch.Tensor, queries: torch.Tensor, radius: float) -> torch.Tensor:
    d = torch.cdist(queries.double().flatten(1), z.double().flatten(1))
    return z[(d <= radius).any(0)].float()


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().cpu().float().flatten(1)
    order = sorted(range(len(flat)), key=lambda i: flat[i].tolist())
    return flat[order]


def channel_gain(x: torch.Tensor) -> torch.Tensor:
    """A latent format's ``process_in`` that is not scalar affine (per-channel scale, then a square)."""
    gain = torch.tensor([1.5, -0.5]).view(1, 2, 1, 1)
    return (x.float() * gain) + 0.1 * x.float().square()


# -- structure ---------------------------------------------------------------------------------------------

def test_protocol_declares_search_listing_mapping_device_and_resizing():
    assert set(protocol_methods()) == {"__len__", "within", "nearest", "latents", "mapped", "on_device", "resampled"}
    assert "item_shape" in ShieldSource.__annotations__


@pytest.mark.parametrize("cls", SOURCE_CLASSES, ids=lambda c: c.__name__)
def test_every_source_class_has_every_protocol_method_with_its_signature(cls):
    for name, declared in protocol_methods().items():
        method = getattr(cls, name, None)
        assert callable(method), f"{cls.__name__} lacks {name}"
        assert params(method) == params(declared), f"{cls.__name__}.{name}{inspect.signature(method)}"


def test_no_module_asks_which_class_a_shield_source_is():
    names = "|".join(c.__name__ for c in SOURCE_CLASSES)
    switch = re.compile(rf"isinstance\([^)]*\b({names})\b|\.source\.shields\b|hasattr\(source,")
    found = [f"{p.relative_to(ROOT)}:{i}" for folder in ("guidance", "nodes", "shield_db", "shielded_webui", "reporting")
             for p in sorted((ROOT / folder).rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if switch.search(line)]
    assert found == []


# -- behaviour ----------------------------------------------------------------------------------------------

@pytest.fixture
def sets(tmp_path):
    z1, z2, zd = latents(6, 1), latents(3, 2), latents(5, 3)
    return z1, z2, zd, TensorShields(z1), TensorShields(z2), database(tmp_path, zd)


def test_every_source_reports_its_item_shape_and_size(sets):
    z1, z2, zd, t1, t2, db = sets
    views = {t1: 6, db: 5, ConcatShields([t1, t2, db]): 14, AffineShields(db, 2.0, 0.5): 5,
             ExcludedShields(t1, z1[:2]): 4}
    for src, n in views.items():
        assert tuple(src.item_shape) == SHAPE and len(src) == n


def test_latents_are_the_stored_shields_in_each_sources_own_order(sets):
    z1, z2, zd, t1, t2, db = sets
    every = torch.cat([z1, z2, zd])
    assert torch.equal(t1.latents([4, 0]), z1[[4, 0]])
    assert torch.equal(db.latents([3, 1]), zd[[3, 1]])
    both = ConcatShields([t1, t2, db])
    assert torch.equal(both.latents([13, 0, 7, 6, 9]), every[[13, 0, 7, 6, 9]])
    assert torch.equal(all_latents(both), every)
    assert torch.equal(AffineShields(db, 2.0, 0.5).latents([2]), (zd[[2]] - 0.5) * 2.0)
    assert torch.equal(ExcludedShields(t1, z1[:1]).latents([0]), z1[[0]])  # the indices nearest() reports
    with pytest.raises(IndexError):
        both.latents([14])


def test_scalar_affine_map_is_a_view_of_any_source(sets):
    """Old to_model_space: AffineShields(source, scale, shift) whatever the source (an index too)."""
    z1, z2, zd, t1, t2, db = sets
    scale, shift = 0.75, -0.2
    for src, z in ((t1, z1), (db, zd), (ConcatShields([t1, db]), torch.cat([z1, zd]))):
        seen = model_space(src, channel_gain, (scale, shift))
        assert isinstance(seen, AffineShields) and seen.source is src
        mapped = (z - shift) * scale
        queries = mapped[:2] + 0.05
        assert torch.allclose(sorted_rows(seen.within(queries, 2.5)), sorted_rows(brute_within(mapped, queries, 2.5)),
                              atol=1e-6)
        dist, idx = seen.nearest(queries)
        want = torch.cdist(queries.double().flatten(1), mapped.double().flatten(1))
        assert torch.equal(idx, want.argmin(1)) and torch.allclose(dist.double(), want.min(1).values, rtol=1e-5)


def test_general_map_copies_in_memory_sets_and_refuses_indexes(sets):
    """Old to_model_space: TensorShields(process_in(shields.clone()).float()), per part of a concatenation; an
    index raised the node's ValueError."""
    z1, z2, zd, t1, t2, db = sets
    seen = model_space(t1, channel_gain, None)
    assert isinstance(seen, TensorShields) and torch.equal(seen.shields.float(), channel_gain(z1))
    both = model_space(ConcatShields([t1, t2]), channel_gain, None)
    assert [type(s) for s in both.sources] == [TensorShields, TensorShields]
    assert torch.equal(all_latents(both), channel_gain(torch.cat([z1, z2])))
    queries = channel_gain(z2[:1]) + 0.01
    assert torch.equal(sorted_rows(both.within(queries, 1.0)),
                       sorted_rows(brute_within(channel_gain(torch.cat([z1, z2])), queries, 1.0)))
    # an affine view of a tensor set maps through its own affine first
    assert torch.allclose(all_latents(AffineShields(t1, 2.0, 0.5).mapped(channel_gain)),
                          channel_gain((z1 - 0.5) * 2.0))
    for indexed in (db, ConcatShields([t1, db]), AffineShields(db, 2.0, 0.0)):
        with pytest.raises(ValueError) as err:
            model_space(indexed, channel_gain, None)
        assert str(err.value) == NOT_MAPPABLE
    with pytest.raises(ValueError, match="excluded last"):
        ExcludedShields(t1, z1[:1]).mapped(channel_gain)


def test_on_device_moves_in_memory_features_and_keeps_indexes(sets):
    """Old on_device: TensorShields.to(device) (same object), a concatenation per part, anything else as is."""
    z1, z2, zd, t1, t2, db = sets
    screened = TensorShields(z1, screen_min_rows=1)
    cpu = torch.device("cpu")
    assert screened.on_device(cpu) is screened and cpu in screened._screens
    assert db.on_device(cpu) is db
    both = ConcatShields([screened, db, t2]).on_device(cpu)
    assert [s is o for s, o in zip(both.sources, (screened, db, t2))] == [True, True, True]
    view = AffineShields(db, 2.0, 0.5).on_device(cpu)
    assert view.source is db and (view.scale, view.shift) == (2.0, 0.5)
    kept = ExcludedShields(screened, z1[:2]).on_device(cpu)
    assert kept.source is screened and len(kept) == 4
    assert torch.equal(sorted_rows(kept.within(z1, 0.0)), sorted_rows(z1[2:]))


def test_resampled_is_an_in_memory_copy_at_the_new_size(sets):
    """Old resampled_source: TensorShields(resample_latents(every latent, size)), from any source."""
    z1, z2, zd, t1, t2, db = sets
    big = (2, 8, 8)
    for src, z in ((t1, z1), (db, zd), (ConcatShields([t1, db]), torch.cat([z1, zd]))):
        out = src.resampled(big)
        assert isinstance(out, TensorShields) and out.item_shape == big
        assert torch.equal(out.shields.float(), resample_latents(z, big[-2:]))
    view = AffineShields(db, 2.0, 0.5).resampled((2, 2, 2))
    assert torch.allclose(all_latents(view), (resample_latents(zd, (2, 2)) - 0.5) * 2.0)
    with pytest.raises(ValueError, match="latent channels"):
        db.resampled((3, 8, 8))
    with pytest.raises(ValueError, match="excluded last"):
        ExcludedShields(t1, z1[:1]).resampled(big)


def test_history_source_is_a_shield_source():
    history.clear("protocol-test")
    history.add("protocol-test", latents(3, 4))
    try:
        src = history.source("protocol-test", SHAPE)
        assert torch.equal(src.latents([2]), latents(3, 4)[[2]])
        assert torch.equal(all_latents(src.resampled((2, 2, 2))), resample_latents(latents(3, 4), (2, 2)))
    finally:
        history.clear("protocol-test")


def test_postgres_source_lists_maps_moves_and_resizes_like_the_file_database():
    from pg_servers import Servers, require_postgres
    require_postgres()
    from shield_db.postgres.store import PostgresShieldStore
    servers = Servers()
    try:
        store = PostgresShieldStore(servers.new().dsn(), "protocol")
        zd = latents(5, 5)
        store.create(SHAPE)
        with store.writer() as w:
            w.add_batch([f"s{i}" for i in range(5)], [f"{i:064x}" for i in range(5)], zd.numpy().astype(np.float16))
        src = store.source()
        try:
            assert tuple(src.item_shape) == SHAPE and len(src) == 5
            assert torch.equal(src.latents([4, 1]), zd[[4, 1]])
            assert src.on_device(torch.device("cpu")) is src
            assert torch.equal(src.resampled((2, 8, 8)).shields.float(), resample_latents(zd, (8, 8)))
            with pytest.raises(ValueError) as err:
                src.mapped(channel_gain)
            assert str(err.value) == NOT_MAPPABLE
            seen = model_space(src, channel_gain, (2.0, 0.5))
            assert torch.equal(sorted_rows(seen.within((zd[:1] - 0.5) * 2.0, 0.0)), sorted_rows((zd[:1] - 0.5) * 2.0))
        finally:
            src.close()
    finally:
        servers.close()


def test_nearest_beyond_reach_is_none_through_every_wrapper(tmp_path):
    """(inf, -1) from an indexed source survives concatenation (no index offset added), affine views (reach
    scaled) and exclusion (no search past reach); in-memory sets stay exact beyond reach."""
    za, zb = latents(600, 4), latents(600, 5) + 3.0
    dba, dbb = (DatabaseShields(database(tmp_path / name, z).snapshot, small_set_rows=0)   # searched by index
                for name, z in (("a", za), ("b", zb)))
    far = torch.full((1, *SHAPE), 60.0)
    dist, idx = ConcatShields([dba, dbb]).nearest(far, 5.0)
    assert idx.tolist() == [-1] and dist.tolist() == [float("inf")]
    mem = TensorShields(zb[:5])
    dist, idx = ConcatShields([dba, mem]).nearest(far, 5.0)             # in memory: exact beyond reach
    want = (far.flatten(1).double() - zb[:5].flatten(1).double()).norm(dim=1)
    assert idx.tolist() == [600 + int(want.argmin())] and torch.allclose(dist.double(), want.min(), rtol=1e-6)
    view = AffineShields(dba, 2.0, 0.0)
    near = 2.0 * za[:1] + 0.01
    d_src = (near / 2.0).flatten(1).double().sub(za.flatten(1).double()).norm(dim=1).min()
    assert view.nearest(near, float(2.0 * d_src) * 1.001)[1].tolist() == [0]
    assert view.nearest(near, float(2.0 * d_src) * 0.999)[1].tolist() == [-1]     # reach scaled into the source
    excluded = ExcludedShields(dba, za[:1])
    dist, idx = excluded.nearest(za[:1], 1e-3)                          # its own shield is left out, none else near
    assert idx.tolist() == [-1] and dist.tolist() == [float("inf")]
