"""Shield sets in PostgreSQL (optional: needs psycopg and a server): exact, fail-closed, partitioned by cell.

Nothing here is imported unless the PostgreSQL backend is chosen; see docs/shield_db_postgres.md.
"""
