"""Core statements compiled once per database dialect and run on the driver's own cursor.

Why: the listener records every received instance with three small statements (look up the SOP Instance
UID, restart the study's quiet timer, insert the row). Recording and committing one instance took 0.52 ms
of CPU, of which 0.06 ms in sqlite3 itself, and 0.455 ms with the statements run here (SQLite on tmpfs,
2,000 instances, 2026-12-03; docs/bench/ingest.md). That CPU is held under the interpreter lock that every
association thread of the listener shares: the serial stage once several associations send.

What stays SQLAlchemy's: the statements themselves (built from the schema with its types), the connection
and its transaction (begun, committed, rolled back and invalidated by the Session as before; SQLite's
`BEGIN IMMEDIATE` comes from the engine's "begin" event), and the error types callers catch: a driver error
is raised as the `sqlalchemy.exc.DBAPIError` subclass SQLAlchemy would raise (IntegrityError, ...), and a
lost connection is invalidated and flagged `connection_invalidated`, so a caller's retry logic is unchanged.
What is skipped: per-execution events (none are registered on these statements) and result processing
(the statements return only integers and strings, which need none).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.expression import Executable

Processor = Callable[[Any], Any]


class _Compiled:
    """One statement compiled for one dialect: its SQL text and how to build the driver's parameters."""

    def __init__(self, statement: Executable, dialect: Dialect, column_keys: Sequence[str] | None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        if compiled.insert_prefetch or compiled.update_prefetch:
            # Python-side defaults (`default=`, `onupdate=`) are computed by SQLAlchemy's execution layer,
            # which this path skips: such a statement must give those columns itself.
            columns = ", ".join(c.key for c in (*compiled.insert_prefetch, *compiled.update_prefetch))
            raise ValueError(f"statement relies on Python-side defaults of {columns}; give them explicitly")
        self.sql = compiled.string
        names = list(compiled.positiontup or ()) if dialect.positional else list(compiled.binds)
        processors: dict[str, Processor | None] = {}
        fixed: dict[str, Any] = {}  # values the statement carries itself (`state == "RECEIVING"`)
        for name in names:
            bind = compiled.binds[name]
            processors[name] = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if not bind.required:
                fixed[name] = bind.effective_value
        self.names = names
        self.processors = processors
        self.fixed = fixed
        self.positional = dialect.positional

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        converted = []
        for name in self.names:
            value = values[name] if name in values else self.fixed[name]
            processor = self.processors[name]
            converted.append(processor(value) if processor is not None and value is not None else value)
        return converted if self.positional else dict(zip(self.names, converted, strict=True))


class PreparedStatement:
    """A Core statement run on the DBAPI cursor of an SQLAlchemy connection, compiled once per dialect.

    `column_keys`: for an INSERT without `.values()`, the columns the parameters give (as
    `Connection.execute` would infer them from its first parameter set)."""

    def __init__(self, statement: Executable, column_keys: Sequence[str] | None = None) -> None:
        self.statement = statement
        self.column_keys = tuple(column_keys) if column_keys else None
        self._by_dialect: dict[Dialect, _Compiled] = {}  # one dialect object per engine
        self._lock = threading.Lock()

    def _compiled(self, dialect: Dialect) -> _Compiled:
        compiled = self._by_dialect.get(dialect)
        if compiled is None:
            with self._lock:
                compiled = self._by_dialect.get(dialect)
                if compiled is None:
                    compiled = self._by_dialect[dialect] = _Compiled(self.statement, dialect, self.column_keys)
        return compiled

    def _run(self, connection: Connection, values: Mapping[str, Any], fetch: str) -> Any:
        dialect = connection.dialect
        compiled = self._compiled(dialect)
        parameters = compiled.parameters(values)
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(compiled.sql, parameters)
            if fetch == "all":
                return cursor.fetchall()
            if fetch == "one":
                return cursor.fetchone()
            return cursor.rowcount
        except dialect.loaded_dbapi.Error as exc:
            invalidated = dialect.is_disconnect(exc, dbapi_connection, cursor)
            if invalidated:
                connection.invalidate(exc)
            raise DBAPIError.instance(
                compiled.sql,
                parameters,
                exc,
                dialect.loaded_dbapi.Error,
                connection_invalidated=invalidated,
                dialect=dialect,
            ) from exc
        finally:
            with contextlib.suppress(dialect.loaded_dbapi.Error):  # the connection is gone: the error says so
                cursor.close()

    def rows(self, connection: Connection, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Every row the statement returns (a SELECT, or DML with RETURNING)."""
        return list(self._run(connection, values, "all"))

    def first(self, connection: Connection, values: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The first row returned, or None."""
        row = self._run(connection, values, "one")
        return tuple(row) if row is not None else None

    def run(self, connection: Connection, values: Mapping[str, Any]) -> int:
        """Execute DML; the number of rows it matched."""
        return int(self._run(connection, values, "none"))
