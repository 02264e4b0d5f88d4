"""The database layer on SQLite and on Postgres: migration 0001, the compare-and-set state machine and
the instance recorder (new study, quiet timer, duplicates, conflicting versions, reopening)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from helpers_gateway import postgres_database
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import State
from core.db import migrate, repository
from core.db.base import Base
from core.db.schema import Instance, Study, StudyEvent
from core.db.session import dispose_engines, session_factory, session_scope
from core.settings import Settings


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    data_dir = tmp_path_factory.mktemp(f"db-{request.param}")
    if request.param == "sqlite":
        s = Settings(data_dir=data_dir)
        migrate.upgrade(s)
        yield s
        dispose_engines()
    else:
        with postgres_database() as url:
            s = Settings(data_dir=data_dir, database_url=url)
            migrate.upgrade(s)
            yield s


def uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def received(study_uid: str, sop_uid: str | None = None, sha: str = "a" * 64, modality: str = "CT"):
    return repository.ReceivedInstance(
        study_uid=study_uid,
        series_uid=study_uid + ".1",
        sop_instance_uid=sop_uid or uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=1234,
        sha256=sha,
        modality=modality,
        calling_ae="STORESCU",
        peer="127.0.0.1",
        patient_id="PID",
        patient_name="Doe^Jane",
    )


def record(settings: Settings, inst: repository.ReceivedInstance, now: datetime | None = None, stable: float = 30):
    with session_scope(settings) as session:
        return repository.record_instance(
            session,
            inst,
            stable_seconds=stable,
            store=lambda version: f"{inst.study_uid}/{inst.series_uid}/{inst.sop_instance_uid}.v{version}.dcm",
            now=now,
        )


def study(settings: Settings, study_uid: str) -> Study:
    with session_scope(settings) as session:
        found = repository.get_study(session, study_uid)
        assert found is not None
        return found


def events(settings: Settings, study_uid: str) -> list[tuple[str | None, str, str | None]]:
    with session_scope(settings) as session:
        rows = session.scalars(select(StudyEvent).where(StudyEvent.study_uid == study_uid).order_by(StudyEvent.id))
        return [(e.from_state, e.to_state, e.detail) for e in rows]


def test_migration_reaches_head_and_matches_the_models(settings: Settings) -> None:
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(migrate.alembic_config()).get_heads()
    assert sorted(migrate.current_heads(settings)) == sorted(heads)  # every revision, whoever added it
    engine = session_factory(settings).kw["bind"]
    gateway_tables = {"studies", "study_events", "instances", "series_results", "instance_results", "regions"}
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": False}), Base.metadata)
    ours = [d for d in diffs if any(t in repr(d) for t in gateway_tables)]
    assert ours == []


def test_upgrade_twice_is_harmless(settings: Settings) -> None:
    migrate.upgrade(settings)
    assert migrate.current_heads(settings)


def test_first_instance_creates_a_receiving_study_with_a_quiet_deadline(settings: Settings) -> None:
    study_uid = uid()
    now = datetime.now(UTC)
    outcome = record(settings, received(study_uid), now=now, stable=30)
    assert outcome.kind == "stored" and outcome.version == 1 and not outcome.reopened
    found = study(settings, study_uid)
    assert found.state == State.RECEIVING
    assert found.quiet_deadline == now + timedelta(seconds=30)
    assert found.quiet_deadline.tzinfo is not None
    assert found.n_instances == 1 and found.modalities == "CT" and found.version == 1
    assert events(settings, study_uid) == [(None, State.RECEIVING, "first instance received")]


def test_every_instance_restarts_the_timer(settings: Settings) -> None:
    study_uid = uid()
    t0 = datetime.now(UTC)
    record(settings, received(study_uid), now=t0, stable=10)
    record(settings, received(study_uid, modality="SR"), now=t0 + timedelta(seconds=7), stable=10)
    found = study(settings, study_uid)
    assert found.quiet_deadline == t0 + timedelta(seconds=17)
    assert found.n_instances == 2 and found.modalities == "CT,SR"
    with session_scope(settings) as session:
        assert study_uid not in repository.due_studies(session, now=t0 + timedelta(seconds=12))
        assert study_uid in repository.due_studies(session, now=t0 + timedelta(seconds=18))


def test_identical_resend_is_a_counted_duplicate(settings: Settings) -> None:
    study_uid, sop = uid(), uid()
    record(settings, received(study_uid, sop, sha="b" * 64))
    outcome = record(settings, received(study_uid, sop, sha="b" * 64))
    assert outcome.kind == "duplicate" and outcome.version == 1
    with session_scope(settings) as session:
        rows = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).all()
        assert [(r.version, r.duplicates, r.conflict) for r in rows] == [(1, 1, False)]
    assert study(settings, study_uid).n_instances == 1


def test_identical_resend_restarts_the_timer_but_counts_nothing_new(settings: Settings) -> None:
    study_uid, sop = uid(), uid()
    t0 = datetime.now(UTC)
    record(settings, received(study_uid, sop, sha="f" * 64), now=t0, stable=10)
    again = record(settings, received(study_uid, sop, sha="f" * 64), now=t0 + timedelta(seconds=5), stable=10)
    assert again.kind == "duplicate"
    found = study(settings, study_uid)
    assert found.quiet_deadline == t0 + timedelta(seconds=15)
    assert (found.n_instances, found.modalities, found.state) == (1, "CT", State.RECEIVING)


def test_a_new_modality_is_merged_once_and_kept_sorted(settings: Settings) -> None:
    study_uid = uid()
    for modality in ("SR", "CT", "SR", "MR"):
        record(settings, received(study_uid, modality=modality))
    found = study(settings, study_uid)
    assert (found.modalities, found.n_instances) == ("CT,MR,SR", 4)
    assert [e[1] for e in events(settings, study_uid)] == [State.RECEIVING]  # one creation event, no more


def test_different_bytes_for_the_same_sop_uid_become_a_flagged_version(settings: Settings) -> None:
    study_uid, sop = uid(), uid()
    record(settings, received(study_uid, sop, sha="c" * 64))
    outcome = record(settings, received(study_uid, sop, sha="d" * 64))
    assert outcome.kind == "conflict" and outcome.version == 2 and outcome.path.endswith(".v2.dcm")
    with session_scope(settings) as session:
        rows = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop).order_by(Instance.version))
        assert [(r.version, r.sha256[0], r.conflict) for r in rows] == [(1, "c", False), (2, "d", True)]
    assert study(settings, study_uid).n_instances == 1


def test_transition_is_compare_and_set(settings: Settings) -> None:
    study_uid = uid()
    record(settings, received(study_uid))
    with session_scope(settings) as session:
        assert not repository.transition(session, study_uid, State.QUEUED, State.SCORING)
        assert repository.transition(session, study_uid, (State.STABLE, State.RECEIVING), State.STABLE, "quiet")
        assert not repository.transition(session, study_uid, State.RECEIVING, State.STABLE)
    with session_scope(settings) as session:
        assert not repository.transition(session, "2.25.0", State.STABLE, State.QUEUED)
        assert repository.transition(
            session, study_uid, State.STABLE, State.QUEUED, queued_at=datetime.now(UTC), attempts=Study.attempts + 1
        )
    found = study(settings, study_uid)
    assert found.state == State.QUEUED and found.attempts == 1 and found.queued_at is not None
    assert events(settings, study_uid)[1:] == [
        (State.RECEIVING, State.STABLE, "quiet"),
        (State.STABLE, State.QUEUED, None),
    ]


def test_transition_extra_condition_guards_the_quiet_timer(settings: Settings) -> None:
    study_uid = uid()
    now = datetime.now(UTC)
    record(settings, received(study_uid), now=now, stable=60)
    with session_scope(settings) as session:
        assert not repository.transition(
            session, study_uid, State.RECEIVING, State.STABLE, where=[Study.quiet_deadline <= now]
        )
    assert study(settings, study_uid).state == State.RECEIVING


def test_transition_not_committed_when_the_caller_rolls_back(settings: Settings) -> None:
    study_uid = uid()
    record(settings, received(study_uid))
    session: Session = session_factory(settings)()
    assert repository.transition(session, study_uid, State.RECEIVING, State.STABLE)
    session.rollback()
    session.close()
    assert study(settings, study_uid).state == State.RECEIVING


def test_only_one_of_racing_transitions_wins(settings: Settings) -> None:
    study_uid = uid()
    record(settings, received(study_uid))
    with session_scope(settings) as session:
        repository.transition(session, study_uid, State.RECEIVING, State.QUEUED)
    wins: list[bool] = []
    barrier = threading.Barrier(4)

    def claim() -> None:
        barrier.wait()
        with session_scope(settings) as session:
            wins.append(repository.transition(session, study_uid, State.QUEUED, State.SCORING, "claimed"))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False, False, False, True]
    assert sum(1 for e in events(settings, study_uid) if e[1] == State.SCORING) == 1


def test_instance_after_scoring_reopens_the_study_as_a_new_version(settings: Settings) -> None:
    study_uid = uid()
    record(settings, received(study_uid))
    with session_scope(settings) as session:
        repository.transition(session, study_uid, State.RECEIVING, State.SCORED, verdict="no_evidence", score=0.1)
    outcome = record(settings, received(study_uid))
    assert outcome.reopened
    found = study(settings, study_uid)
    assert (found.state, found.version, found.verdict, found.n_instances) == (State.RECEIVING, 2, None, 2)
    assert events(settings, study_uid)[-1][:2] == (State.SCORED, State.RECEIVING)
    assert "reopened" in (events(settings, study_uid)[-1][2] or "")


def test_instance_while_stable_resumes_without_a_new_version(settings: Settings) -> None:
    study_uid = uid()
    record(settings, received(study_uid))
    with session_scope(settings) as session:
        repository.transition(session, study_uid, State.RECEIVING, State.STABLE)
    outcome = record(settings, received(study_uid))
    assert not outcome.reopened
    found = study(settings, study_uid)
    assert (found.state, found.version) == (State.RECEIVING, 1)


def test_reopen_while_scoring_makes_the_workers_commit_fail(settings: Settings) -> None:
    study_uid = uid()
    record(settings, received(study_uid))
    with session_scope(settings) as session:
        repository.transition(session, study_uid, State.RECEIVING, State.SCORING, lease_owner="w1")
    record(settings, received(study_uid))  # a late instance arrives while the worker scores
    with session_scope(settings) as session:
        assert not repository.transition(session, study_uid, State.SCORING, State.SCORED)
    found = study(settings, study_uid)
    assert (found.state, found.version, found.lease_owner) == (State.RECEIVING, 2, None)


def test_duplicate_of_a_finished_study_does_not_reopen_it(settings: Settings) -> None:
    study_uid, sop = uid(), uid()
    record(settings, received(study_uid, sop, sha="e" * 64))
    with session_scope(settings) as session:
        repository.transition(session, study_uid, State.RECEIVING, State.DELIVERED)
    assert record(settings, received(study_uid, sop, sha="e" * 64)).kind == "duplicate"
    assert study(settings, study_uid).state == State.DELIVERED


def test_our_own_report_routed_back_is_kept_without_reopening_the_study(settings: Settings) -> None:
    """A PACS rule forwarding whole studies sends btd's SR back: storing it must not start another round
    of scoring, reporting and forwarding; a new CT image still reopens the study."""
    import dataclasses

    study_uid = uid()
    record(settings, received(study_uid))
    with session_scope(settings) as session:
        repository.transition(session, study_uid, State.RECEIVING, State.DELIVERED, verdict="suspicious")
    sr = dataclasses.replace(received(study_uid), sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", modality="SR")
    outcome = record(settings, sr)
    assert outcome.kind == "stored" and not outcome.reopened
    found = study(settings, study_uid)
    assert (found.state, found.version, found.verdict, found.n_instances) == (State.DELIVERED, 1, "suspicious", 2)
    assert record(settings, received(study_uid)).reopened
    assert study(settings, study_uid).version == 2


def test_times_are_timezone_aware_utc(settings: Settings, tmp_path: Path) -> None:
    study_uid = uid()
    record(settings, received(study_uid))
    found = study(settings, study_uid)
    for value in (found.created_at, found.updated_at, found.state_since, found.quiet_deadline):
        assert value is not None and value.utcoffset() == timedelta(0)


def test_btd_db_upgrade_works_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from btd.cli import main
    from core.settings import get_settings

    monkeypatch.chdir(tmp_path)  # nowhere near the repository's migrations folder
    monkeypatch.delenv("BTD_DATABASE_URL", raising=False)
    monkeypatch.setenv("BTD_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        assert main(["db", "upgrade"]) == 0
    finally:
        get_settings.cache_clear()
        dispose_engines()
    assert capsys.readouterr().out.startswith("database at 0")  # a numbered revision, not "base"
    assert (tmp_path / "data" / "btd.sqlite3").exists()
