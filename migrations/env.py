"""Alembic environment: runs migrations on the connection or URL that core.db.migrate hands over.

Why no alembic.ini: `btd db upgrade` must work from any working directory and from an installed package,
so core/db/migrate.py builds the Alembic Config in code and passes the database URL (or an open
connection, for tests) through `config.attributes`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

import core.db.schema  # noqa: F401 - defines every table on Base.metadata, so autogenerate sees the schema
from core.db.base import Base
from core.db.session import make_engine

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
