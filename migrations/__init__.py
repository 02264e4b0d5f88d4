"""Alembic migrations of btd's database (run with `btd db upgrade`; see core/db/migrate.py)."""
