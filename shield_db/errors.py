"""Errors raised by shield databases; every message names the file and how to recover."""
from __future__ import annotations


class ShieldDatabaseError(ValueError):
    """A shield database cannot be used as it is."""


class CorruptDatabaseError(ShieldDatabaseError):
    """A file of the database is missing, truncated or edited."""

    def __init__(self, database: str, file: str, reason: str):
        self.database, self.file, self.reason = str(database), str(file), reason
        super().__init__(
            f"shield database {self.database}: {self.file} is corrupt ({reason}). Rebuild it (ComfyUI: the "
            f"Shield Set Loader's 'rebuild' input; command line: `python -m shield_db build --rebuild ...`) or "
            f"delete the folder {self.database}; the images are encoded again on the next load.")


class DatabaseLockedError(ShieldDatabaseError):
    """Another writer kept the database lock longer than the timeout."""


class ReadOnlyDatabaseError(ShieldDatabaseError):
    """The database lies on read-only media or in a folder this process may not write: it can only be read."""
