"""Private PostgreSQL servers for the Postgres shield source tests (skipped, with the reason, when unavailable)."""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile

import pytest

PORTS = itertools.count(55400 + os.getpid() % 500 * 8)


def skip_or_fail(reason: str):
    """Skip with the reason; under CI (``SHIELDED_REQUIRE_HOSTS=1``) a missing piece fails the run instead."""
    if os.environ.get("SHIELDED_REQUIRE_HOSTS") == "1":
        pytest.fail(f"required here (SHIELDED_REQUIRE_HOSTS=1): {reason}")
    pytest.skip(reason)


def require_postgres():
    """Skip with a visible reason unless psycopg and PostgreSQL's server binaries (with cube) are here."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        skip_or_fail("psycopg not installed: pip install 'psycopg[binary]' to run the PostgreSQL shield source tests")
    from shield_db.postgres.errors import PostgresUnavailableError
    from shield_db.postgres.server import find_bin_dir
    try:
        bin_dir = find_bin_dir()
    except PostgresUnavailableError as err:
        skip_or_fail(f"PostgreSQL server binaries not found ({err})")
    share = bin_dir.parent / "share" if (bin_dir.parent / "share").is_dir() else None
    return bin_dir, share


class Servers:
    """Start servers on demand in one temporary folder; stop and delete everything at the end."""

    def __init__(self):
        from shield_db.postgres.server import EmbeddedServer
        self.make = EmbeddedServer
        self.root = tempfile.mkdtemp(prefix="shield-pg-")
        os.chmod(self.root, 0o711)  # a server run as 'postgres' (we are root) must enter it
        self.started = []

    def new(self):
        server = self.make(os.path.join(self.root, f"s{len(self.started)}"), port=next(PORTS)).start()
        self.started.append(server)
        return server

    def close(self):
        for server in self.started:
            try:
                server.stop(mode="immediate")
            except Exception:  # a test may have stopped it already
                pass
        shutil.rmtree(self.root, ignore_errors=True)
