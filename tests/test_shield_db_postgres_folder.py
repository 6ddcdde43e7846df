"""Folder -> PostgreSQL shield set: the file database's manifest semantics (incremental, content hashes, deletes,
bad files listed) on the Postgres store, and the missing-dependency message."""
import numpy as np
import pytest

from pg_servers import Servers, require_postgres
from test_shield_db_folder import FakeVAE, H, ITEM, W, good_folder, save

require_postgres()

from shield_db.images import load_for_encode  # noqa: E402
from shield_db.postgres.sync import sync_folder_postgres  # noqa: E402


@pytest.fixture(scope="module")
def server():
    s = Servers()
    yield s.new()
    s.close()


def sync(folder, vae, server, **kw):
    kw.setdefault("batch_size", 3)
    return sync_folder_postgres(folder, vae, ITEM, W, H, "center-crop", "fake-vae", server.dsn(), **kw)


def test_second_load_calls_the_vae_zero_times(tmp_path, server):
    folder = good_folder(tmp_path)
    first, again = FakeVAE(), FakeVAE()
    r1, _ = sync(folder, first, server)
    assert r1.encoded == 5 and first.images == 5 and first.calls == 2
    r2, store = sync(folder, again, server)
    assert again.calls == 0 and r2.kept == 5 and r2.encoded == 0
    src = store.source()
    assert len(src) == 5 and sorted(src.sources(range(5))) == [f"img{i}.png" for i in range(5)]
    expect = first(np.stack([load_for_encode(folder / "img3.png", W, H, "center-crop")]))[0]
    idx = src.sources(range(5)).index("img3.png")
    assert np.allclose(src.latents([idx])[0].numpy(), expect, atol=1e-3)
    assert src.thumbnails([idx]).shape == (1, 48, 48, 3)


def test_added_removed_renamed_and_touched_files(tmp_path, server):
    folder = good_folder(tmp_path)
    sync(folder, FakeVAE(), server)
    (folder / "img0.png").unlink()
    (folder / "img1.png").rename(folder / "renamed.png")
    (folder / "img2.png").touch()
    save(folder / "sub" / "new.png", seed=99)
    vae = FakeVAE()
    r, store = sync(folder, vae, server)
    assert vae.images == 1 and r.encoded == 1
    assert r.removed == 2 and r.reused == 1
    src = store.source()
    assert sorted(src.sources(range(len(src)))) == ["img2.png", "img3.png", "img4.png", "renamed.png", "sub/new.png"]
    save(folder / "img3.png", seed=123)
    vae = FakeVAE()
    r, store = sync(folder, vae, server)
    assert vae.images == 1 and len(store.source()) == 5
    (folder / "broken.png").write_bytes(b"not a png")
    r, store = sync(folder, FakeVAE(), server)
    assert [s["source"] for s in r.skipped] == ["broken.png"] and len(store.source()) == 5
    vae = FakeVAE()
    r, _ = sync(folder, vae, server, rebuild=True)
    assert vae.images == 5 and r.encoded == 5


def test_choosing_postgres_without_psycopg_says_how_to_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_psycopg(name, *args, **kwargs):
        if name == "psycopg" or name.startswith("psycopg."):
            raise ImportError("No module named 'psycopg'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    from shield_db.postgres.errors import PostgresUnavailableError
    from shield_db.postgres.store import PostgresShieldStore
    with pytest.raises(PostgresUnavailableError, match=r"pip install \"psycopg\[binary\]\""):
        PostgresShieldStore("host=/nowhere dbname=x").exists()


def test_cli_build_into_postgres(tmp_path, server):
    """`python -m shield_db build --backend postgres` parses and builds (the encoder here is the fake VAE)."""
    from shield_db.cli import parser
    from shield_db.postgres.cli import build
    from shield_db.postgres.store import PostgresShieldStore
    args = parser().parse_args(["build", str(tmp_path), "--vae", "v.safetensors", "--width", str(W), "--height",
                                str(H), "--backend", "postgres", "--dsn", server.dsn(), "--name", "cli_set",
                                "--commit-rows", "2", "--shard", "local"])
    assert args.backend == "postgres" and args.shard == ["local"]
    folder = good_folder(tmp_path)
    vae = FakeVAE()
    assert build(args, folder, vae, ITEM, "fake-vae", None) == 0 and vae.images == 5
    src = PostgresShieldStore(server.dsn(), "cli_set").source()
    assert sorted(src.sources(range(len(src)))) == [f"img{i}.png" for i in range(5)]
    assert parser().parse_args(["build", "f", "--vae", "v"]).backend == "files"  # the default is unchanged
