"""`btd db upgrade`: run every Alembic revision in migrations/versions up to head.

Why Alembic is configured in code: the command must work from any working directory and from an
installed package, so nothing may depend on an alembic.ini in the current directory. The migrations
folder lies beside the `core` package, in a source checkout as in an installed package.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

from core.settings import Settings


def migrations_dir() -> Path:
    """The `migrations` folder: beside the `core` package, in a source checkout as in site-packages.

    Found by path, not imported: the revisions are data this module hands to Alembic (which imports them
    itself), and the migrations import core.db, so importing them from here would be an arrow upward."""
    candidate = Path(__file__).resolve().parents[2] / "migrations"
    if (candidate / "env.py").exists():
        return candidate
    raise FileNotFoundError(f"cannot find btd's migrations folder ({candidate}/env.py)")


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


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Bring the settings' database to `revision` (all revisions, including other parts' ones)."""
    if settings.uses_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings.resolved_database_url), revision)


def current_heads(settings: Settings) -> list[str]:
    """The revision(s) the database is at (empty before the first upgrade)."""
    from alembic.runtime.migration import MigrationContext

    from core.db.session import make_engine

    engine = make_engine(settings.resolved_database_url)
    try:
        with engine.connect() as conn:
            return list(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
