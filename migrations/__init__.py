"""Alembic migrations of btd's database (run with `btd db upgrade`; see service/db/migrate.py)."""
