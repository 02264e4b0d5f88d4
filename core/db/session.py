"""Engines and sessions for SQLite (the default) and Postgres (production).

Why these SQLite settings: WAL lets the API read while the listener writes; `synchronous=FULL` makes a
commit durable before C-STORE answers success; the busy timeout makes concurrent writers wait instead of
failing; foreign keys are off in SQLite unless asked for. Every SQLite transaction starts with
`BEGIN IMMEDIATE`, so a read-then-write transaction (the instance recorder, the state machine) takes the
write lock up front and waits for it, instead of failing with "database is locked" when it upgrades.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000

_engines: dict[tuple[str, bool], Engine] = {}
_engines_lock = threading.Lock()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see "begin" below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, pre_ping: bool = True) -> Engine:
    """A new engine for `url` (SQLite file or Postgres); creates the SQLite file's folder.

    `pre_ping` (Postgres): test each pooled connection with a round trip when it is checked out, so a
    connection the server dropped is replaced unseen. The listener turns it off (a round trip per instance,
    ~1 ms on the ingest benchmark) and instead retries once on a connection found dead."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _configure_sqlite(engine)
        return engine
    connect_args = {"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {}
    return create_engine(url, pool_pre_ping=pre_ping, connect_args=connect_args)


def get_engine(settings: Settings, *, pre_ping: bool = True) -> Engine:
    """The process-wide engine for the settings' database URL (one pool per URL and pre-ping choice)."""
    url = settings.resolved_database_url
    key = (url, pre_ping or make_url(url).get_backend_name() == "sqlite")  # SQLite never pings: one pool
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(url, pre_ping=key[1])
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests, and a process about to fork)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def session_factory(settings: Settings, *, pre_ping: bool = True) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(settings, pre_ping=pre_ping), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits at the end of the block and rolls back if it raises."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
