"""Errors of the PostgreSQL shield source (subclasses of the file database's, so callers catch one family)."""
from __future__ import annotations

from ..errors import ShieldDatabaseError

INSTALL_PSYCOPG = "python -m pip install \"psycopg[binary]\""


class PostgresUnavailableError(ShieldDatabaseError):
    """The driver or the server binaries are missing, or the server cannot be reached."""


class ShieldQueryError(ShieldDatabaseError):
    """A query (or one shard of it) failed: the search has no answer, never an empty one."""


def require_psycopg():
    """The ``psycopg`` module (v3), or an error saying how to install it."""
    try:
        import psycopg
    except ImportError as err:
        raise PostgresUnavailableError(f"the PostgreSQL shield source needs the Python package psycopg (v3), which "
                                       f"failed to import ({err}); install it into this Python with "
                                       f"`{INSTALL_PSYCOPG}`. Nothing else in the pack needs it.") from None
    return psycopg
