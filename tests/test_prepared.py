"""core.db.prepared on SQLite and PostgreSQL: statements run on the driver's cursor write what SQLAlchemy's
execution layer would write (typed values read back equal through the ORM), raise SQLAlchemy's error types,
and refuse statements whose Python-side defaults that layer would have filled in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers_gateway import postgres_database
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from core.contracts import State
from core.db import migrate
from core.db.prepared import PreparedStatement
from core.db.schema import Instance, Study
from core.db.session import dispose_engines, session_scope
from core.settings import Settings

pytestmark = pytest.mark.timeout(60)

_STUDY_COLUMNS = [c.key for c in Study.__table__.columns if c.key != "id"]
_INSERT_STUDY = PreparedStatement(insert(Study.__table__), column_keys=_STUDY_COLUMNS)
_INSERT_INSTANCE = PreparedStatement(
    insert(Instance.__table__), column_keys=[c.key for c in Instance.__table__.columns if c.key != "id"]
)
_STATE_OF = PreparedStatement(select(Study.state, Study.updated_at).where(Study.study_uid == bindparam("b_uid")))


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if request.param == "postgres" else None
        settings = Settings(data_dir=tmp_path, **({"database_url": url} if url else {}))
        migrate.upgrade(settings)
        yield settings
        dispose_engines()


def study_values(uid: str, at: datetime) -> dict[str, object]:
    values: dict[str, object] = dict.fromkeys(_STUDY_COLUMNS)
    values.update(
        study_uid=uid, state=State.RECEIVING, state_since=at, quiet_deadline=at, version=1, n_instances=0,
        attempts=0, created_at=at, updated_at=at, patient_name="Name^Given",
    )  # fmt: skip
    return values


def instance_values(study_uid: str, sop: str, at: datetime) -> dict[str, object]:
    return {
        "study_uid": study_uid, "series_uid": study_uid + ".1", "sop_instance_uid": sop,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "modality": "CT", "transfer_syntax": "1.2.840.10008.1.2.1",
        "size": 10, "sha256": "c" * 64, "path": f"x/{sop}.dcm", "version": 1, "conflict": False, "duplicates": 0,
        "calling_ae": None, "peer": None, "received_at": at,
    }  # fmt: skip


def test_typed_values_read_back_as_sqlalchemy_wrote_them(settings: Settings) -> None:
    """Datetimes with and without microseconds (SQLite keeps them as text: the format must be SQLAlchemy's,
    or comparisons in SQL and the ORM's reading would go wrong), booleans, NULLs."""
    whole = datetime(2026, 12, 3, 15, 0, 0, tzinfo=UTC)
    fraction = datetime(2026, 12, 3, 15, 0, 0, 250_000, tzinfo=UTC)
    with session_scope(settings) as session:
        connection = session.connection()
        _INSERT_STUDY.run(connection, study_values("2.25.1", whole))
        _INSERT_INSTANCE.run(connection, instance_values("2.25.1", "2.25.1.1", fraction))
        assert _STATE_OF.first(connection, {"b_uid": "2.25.1"}) is not None
    with session_scope(settings) as session:
        study = session.scalars(select(Study).where(Study.study_uid == "2.25.1")).one()
        assert study.updated_at == whole and study.quiet_deadline == whole
        assert study.patient_name == "Name^Given" and study.modalities is None
        row = session.scalars(select(Instance)).one()
        assert row.received_at == fraction and row.conflict is False
        # SQL comparisons see the same instants as Python does
        assert session.scalar(select(Study.study_uid).where(Study.quiet_deadline <= whole)) == "2.25.1"
        assert session.scalar(select(Study.study_uid).where(Study.quiet_deadline < whole)) is None
        assert session.scalar(select(Instance.id).where(Instance.received_at > whole)) == row.id


def test_driver_errors_are_raised_as_sqlalchemy_errors_and_the_transaction_rolls_back(settings: Settings) -> None:
    at = datetime.now(UTC)
    with session_scope(settings) as session:
        connection = session.connection()
        _INSERT_STUDY.run(connection, study_values("2.25.2", at))
        _INSERT_INSTANCE.run(connection, instance_values("2.25.2", "2.25.2.1", at))
    with pytest.raises(IntegrityError), session_scope(settings) as session:  # (sop_instance_uid, version) taken
        _INSERT_INSTANCE.run(session.connection(), instance_values("2.25.2", "2.25.2.1", at))
    with session_scope(settings) as session:
        assert len(session.scalars(select(Instance)).all()) == 1


def test_a_statement_that_needs_python_side_defaults_is_refused(settings: Settings) -> None:
    """Study.updated_at has `onupdate=`: SQLAlchemy's execution layer fills it in, this path would not."""
    relies_on_onupdate = PreparedStatement(
        update(Study.__table__).where(Study.study_uid == bindparam("b_uid")).values(modalities="CT")
    )
    with session_scope(settings) as session, pytest.raises(ValueError, match="updated_at"):
        relies_on_onupdate.run(session.connection(), {"b_uid": "2.25.3"})
