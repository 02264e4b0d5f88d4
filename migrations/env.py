"""Alembic environment: runs migrations on the connection or URL that service.db.migrate hands over.

Why no alembic.ini: `btd db upgrade` must work from any working directory and from an installed package,
so service/db/migrate.py builds the Alembic Config in code and passes the database URL (or an open
connection, for tests) through `config.attributes`.
"""

from __future__ import annotations

import contextlib
import importlib

from alembic import context
from sqlalchemy import Connection

from service.db.base import Base
from service.db.session import make_engine

# Import every module that defines tables, so autogenerate sees the whole schema.
for _module in ("service.db.models", "service.db.reporting"):
    with contextlib.suppress(ModuleNotFoundError):
        importlib.import_module(_module)

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=config.attributes.get("url") or config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
