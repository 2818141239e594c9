"""Persistence: stored completions, files, fine-tuning jobs and their events, adapter lineage.

One door per thing stored (`completions`, `files`, `jobs`, `adapters`), each owning its tables
and queries in SQLAlchemy 2 style; `db` owns the engine, sessions and Alembic migrations.
SQLite by default, any SQLAlchemy async URL (PostgreSQL for replicas); no dialect-only SQL.

Exceptions (`StoreError` and below): `NotFound` (no such row), `Conflict` (the row exists, or
is in use by something that needs it).
"""

from steer.store.db import Conflict, Database, NotFound, StoreError

__all__ = ["Conflict", "Database", "NotFound", "StoreError"]
