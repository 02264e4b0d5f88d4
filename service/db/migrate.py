"""`btd db upgrade`: run every Alembic revision in migrations/versions up to head.

Why Alembic is configured in code: the command must work from any working directory and from an
installed package, so nothing may depend on an alembic.ini in the current directory. The migrations
folder is found as the `migrations` package (installed beside `service`) or, in a source checkout,
next to the `service` folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

from service.settings import Settings, get_settings


def migrations_dir() -> Path:
    spec = importlib.util.find_spec("migrations")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations)))
        if (candidate / "env.py").exists():
            return candidate
    candidate = Path(__file__).resolve().parents[2] / "migrations"
    if (candidate / "env.py").exists():
        return candidate
    raise FileNotFoundError("cannot find btd's migrations folder (migrations/env.py)")


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if url:
        config.attributes["url"] = url
        # Alembic interpolates %; the URL travels in attributes, this copy is only for `alembic` tooling.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(settings: Settings | None = None, revision: str = "head") -> None:
    """Bring the settings' database to `revision` (all revisions, including other parts' ones)."""
    settings = settings or get_settings()
    if settings.resolved_database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings.resolved_database_url), revision)


def current_heads(settings: Settings | None = None) -> list[str]:
    """The revision(s) the database is at (empty before the first upgrade)."""
    from alembic.runtime.migration import MigrationContext

    from service.db.session import make_engine

    engine = make_engine((settings or get_settings()).resolved_database_url)
    try:
        with engine.connect() as conn:
            return list(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
