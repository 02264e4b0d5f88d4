"""The only writers of study state and of received instances.

Why compare-and-set: a Celery task may be delivered twice, a worker may die mid-task, the listener and the
stability monitor run in parallel threads, and several gateway or worker processes may share one database.
`transition` changes a study's state only if it is still in the state the caller saw, in one
`UPDATE ... WHERE state = :seen`, so exactly one of two racing callers wins; the loser gets False and must
not do the work. Nothing here commits: the caller commits, so a transition and the rows it belongs with
(results, a report) are written in one transaction or not at all.

Reopening a study while it is SCORING: the instance recorder moves it SCORING -> RECEIVING (version + 1,
lease cleared). The worker's later `transition(..., SCORING, SCORED)` then returns False; the worker must
write its results in the same transaction as that transition and roll back when it fails, so results of
the old version are never attached to the reopened study. The study is scored again once it is quiet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.contracts import RESUMABLE_STATES, SCOREABLE_SOP_CLASSES, State
from core.db.base import utcnow
from core.db.prepared import PreparedStatement
from core.db.schema import Instance, ReferenceSample, Report, Study, StudyEvent

_CAS_ATTEMPTS = 5


def _as_tuple(expected: str | Iterable[str]) -> tuple[str, ...]:
    return (expected,) if isinstance(expected, str) else tuple(expected)


def add_event(session: Session, study_uid: str, from_state: str | None, to_state: str, detail: str | None) -> None:
    session.add(StudyEvent(study_uid=study_uid, at=utcnow(), from_state=from_state, to_state=to_state, detail=detail))


def transition(
    session: Session,
    study_uid: str,
    expected: str | Iterable[str],
    new: str,
    detail: str | None = None,
    *,
    where: Iterable[ColumnElement[bool]] = (),
    **values: Any,
) -> bool:
    """Move a study from one of the `expected` states to `new`, atomically; False if it was not in them.

    `where` adds conditions to the same UPDATE (e.g. `Study.quiet_deadline <= now`), `values` sets other
    columns in it (e.g. `lease_owner=...`, `attempts=Study.attempts + 1`). A study_events row records the
    step. The caller commits.
    """
    expected_states = _as_tuple(expected)
    conditions = list(where)
    for _ in range(_CAS_ATTEMPTS):
        seen = session.scalar(select(Study.state).where(Study.study_uid == study_uid))
        if seen is None or seen not in expected_states:
            return False
        now = utcnow()
        result = session.execute(
            update(Study)
            .where(Study.study_uid == study_uid, Study.state == seen, *conditions)
            .values(state=new, state_since=now, updated_at=now, **values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            add_event(session, study_uid, seen, new, detail)
            session.flush()
            return True
        if conditions:
            # The state was right but an extra condition failed, or the state changed meanwhile: re-read.
            still = session.scalar(select(Study.state).where(Study.study_uid == study_uid))
            if still == seen:
                return False
    return False


def get_study(session: Session, study_uid: str) -> Study | None:
    return session.scalar(select(Study).where(Study.study_uid == study_uid))


@dataclass(frozen=True)
class ReceivedInstance:
    """What the listener knows about one received instance before it is stored."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int
    sha256: str
    modality: str | None = None
    calling_ae: str | None = None
    peer: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None
    study_description: str | None = None


@dataclass(frozen=True)
class RecordOutcome:
    """`kind`: "stored" (new SOP instance), "conflict" (new bytes for a known SOP instance, kept as a new
    version), or "duplicate" (identical bytes already stored; nothing written)."""

    kind: str
    version: int
    path: str
    reopened: bool = False


# The hot path of `record_instance` runs these Core statements on the session's connection, built once:
# the ORM's per-call statement building, cache-key work and unit-of-work flush were about 40 % of the
# listener's CPU per instance. The five of the common path are compiled once per dialect and run on the
# driver's cursor (core.db.prepared): SQLAlchemy's execution layer was most of the rest. Same transaction as
# the session, so the caller's commit covers them.
_STUDIES = Study.__table__
_INSTANCES = Instance.__table__
_EVENTS = StudyEvent.__table__

_SELECT_STUDY = select(_STUDIES.c.state, _STUDIES.c.modalities).where(_STUDIES.c.study_uid == bindparam("b_uid"))
_SELECT_KNOWN = PreparedStatement(
    select(_INSTANCES.c.id, _INSTANCES.c.version, _INSTANCES.c.sha256, _INSTANCES.c.path).where(
        _INSTANCES.c.sop_instance_uid == bindparam("b_sop")
    )
)
_COUNT_DUPLICATE = PreparedStatement(
    update(_INSTANCES).where(_INSTANCES.c.id == bindparam("b_id")).values(duplicates=_INSTANCES.c.duplicates + 1)
)
# A new instance for a RECEIVING study (by far the common case): restart the timer and count it in one
# statement; RETURNING hands back the modalities so a new one can be merged without another read.
_TOUCH_RECEIVING = PreparedStatement(
    update(_STUDIES)
    .where(_STUDIES.c.study_uid == bindparam("b_uid"), _STUDIES.c.state == State.RECEIVING)
    .values(
        quiet_deadline=bindparam("b_deadline", type_=_STUDIES.c.quiet_deadline.type),
        updated_at=bindparam("b_now", type_=_STUDIES.c.updated_at.type),
        n_instances=_STUDIES.c.n_instances + bindparam("b_inc"),
    )
    .returning(_STUDIES.c.modalities)
)
_SET_MODALITIES = PreparedStatement(
    update(_STUDIES)
    .where(_STUDIES.c.study_uid == bindparam("b_uid"))
    .values(
        modalities=bindparam("b_modalities", type_=_STUDIES.c.modalities.type),
        updated_at=bindparam("b_now", type_=_STUDIES.c.updated_at.type),
    )
)
_INSERT_INSTANCE = PreparedStatement(
    insert(_INSTANCES),
    column_keys=[column.key for column in _INSTANCES.columns if column.key != "id"],
)
_INSERT_EVENT = insert(_EVENTS)


def _insert_study_if_missing(connection: Connection, values: dict[str, Any]) -> bool:
    """INSERT the study unless its UID exists (a racing connection may have created it); True if inserted."""
    dialect = connection.dialect.name
    if dialect in ("sqlite", "postgresql"):
        dialect_insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
        statement = dialect_insert(_STUDIES).values(**values).on_conflict_do_nothing(index_elements=["study_uid"])
        return connection.execute(statement).rowcount == 1
    try:  # any other database: a savepoint around a plain INSERT
        with connection.begin_nested():
            connection.execute(insert(_STUDIES).values(**values))
        return True
    except IntegrityError:
        return False


def _ensure_study(
    connection: Connection, received: ReceivedInstance, now: datetime, deadline: datetime
) -> tuple[str, str | None]:
    """The study's (state, modalities), creating it RECEIVING (with its quiet deadline) if it is new."""
    row = connection.execute(_SELECT_STUDY, {"b_uid": received.study_uid}).first()
    if row is not None:
        return row.state, row.modalities
    created = _insert_study_if_missing(
        connection,
        {
            "study_uid": received.study_uid,
            "state": State.RECEIVING,
            "state_since": now,
            "quiet_deadline": deadline,
            "version": 1,
            "modalities": None,
            "n_instances": 0,
            "attempts": 0,
            "patient_id": received.patient_id,
            "patient_name": received.patient_name,
            "study_date": received.study_date,
            "study_description": received.study_description,
            "created_at": now,
            "updated_at": now,
        },
    )
    if created:
        connection.execute(
            _INSERT_EVENT,
            {
                "study_uid": received.study_uid,
                "at": utcnow(),
                "from_state": None,
                "to_state": State.RECEIVING,
                "detail": "first instance received",
            },
        )
        return State.RECEIVING, None
    row = connection.execute(_SELECT_STUDY, {"b_uid": received.study_uid}).one()  # theirs, created meanwhile
    return row.state, row.modalities


def new_version_values() -> dict[str, Any]:
    """What starts afresh when a study begins a new version (reopened by a new image, or rescored): the
    old verdict, error, attempt count and lease belong to the previous version's pass."""
    return {
        "version": Study.version + 1,
        "verdict": None,
        "score": None,
        "error": None,
        "attempts": 0,
        "lease_owner": None,
        "lease_until": None,
    }


def _touch_study(session: Session, study_uid: str, seen: str, deadline: datetime, **values: Any) -> bool:
    """Restart the quiet timer of a RECEIVING study, or move a later study back to RECEIVING, setting
    `values` (counters) in the same UPDATE. `seen` is the state the caller read; if it changed meanwhile
    the row is re-read. Returns True if the study was reopened as a new version."""
    state: str | None = seen
    for _ in range(_CAS_ATTEMPTS):
        if state == State.RECEIVING:
            result = session.execute(
                update(Study)
                .where(Study.study_uid == study_uid, Study.state == State.RECEIVING)
                .values(quiet_deadline=deadline, updated_at=utcnow(), **values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                return False
        elif state in RESUMABLE_STATES:
            if transition(
                session, study_uid, state, State.RECEIVING, "more instances arrived", quiet_deadline=deadline, **values
            ):
                return False
        elif state is not None and transition(
            session,
            study_uid,
            state,
            State.RECEIVING,
            f"reopened: new instance after {state}",
            quiet_deadline=deadline,
            queued_at=None,
            **new_version_values(),
            **values,
        ):
            return True
        state = session.scalar(select(Study.state).where(Study.study_uid == study_uid))
    raise RuntimeError(f"could not update study {study_uid}: its state kept changing")


def _merge_modalities(current: str | None, modality: str | None) -> str | None:
    values = {m for m in (current or "").split(",") if m}
    if modality:
        values.add(modality)
    return ",".join(sorted(values))[:64] or None  # the column holds 64 characters


def record_instance(
    session: Session,
    received: ReceivedInstance,
    *,
    stable_seconds: float,
    store: Callable[[int], str],
    now: datetime | None = None,
) -> RecordOutcome:
    """Record one received instance; call `store(version) -> spool-relative path` to write its bytes.

    - a new study starts RECEIVING with `quiet_deadline = now + stable_seconds`; every instance restarts
      the timer of a RECEIVING study;
    - identical bytes already stored under the SOP Instance UID: `duplicates + 1`, nothing stored;
    - different bytes: stored as the next version with `conflict=True` (kept and flagged, never replaced);
    - a new instance for a study past STABLE reopens it (RECEIVING, version + 1, event "reopened ..."),
      unless it is not a scoreable image (e.g. btd's own SR routed back): that one is only stored.

    `store` runs inside the transaction, before the study row is updated and the row inserted, so the row
    never points at bytes that are not on disk, and a waiting write never holds the study's row lock (on
    PostgreSQL another process recording the same study waits on it); if the caller's commit then fails
    it must remove the file it stored.
    """
    now = now or utcnow()
    deadline = now + timedelta(seconds=stable_seconds)
    connection = session.connection()
    study_uid = received.study_uid

    known = _SELECT_KNOWN.rows(connection, {"b_sop": received.sop_instance_uid})
    for row_id, row_version, row_sha256, row_path in known:
        if row_sha256 == received.sha256:
            _COUNT_DUPLICATE.run(connection, {"b_id": row_id})
            timer = {"b_uid": study_uid, "b_deadline": deadline, "b_now": now, "b_inc": 0}
            if _TOUCH_RECEIVING.first(connection, timer) is None:
                _ensure_study(connection, received, now, deadline)  # past RECEIVING (or missing): no timer
            return RecordOutcome("duplicate", row_version, row_path)

    version = max((row[1] for row in known), default=0) + 1
    inc = 1 if version == 1 else 0
    # The bytes get their final name before the study row is touched: on PostgreSQL the update holds the
    # study's row lock until the commit, and another receiving process recording the same study waits for it.
    path = store(version)
    touched = _TOUCH_RECEIVING.first(
        connection, {"b_uid": study_uid, "b_deadline": deadline, "b_now": now, "b_inc": inc}
    )
    reopened = False
    if touched is not None:  # RECEIVING: timer restarted and counted; only a new modality is left to add
        (modalities,) = touched
        merged = _merge_modalities(modalities, received.modality)
        if merged != modalities:
            _SET_MODALITIES.run(connection, {"b_uid": study_uid, "b_modalities": merged, "b_now": now})
    else:  # a new study, or one past RECEIVING: the general path
        state, modalities = _ensure_study(connection, received, now, deadline)
        counters: dict[str, Any] = {}
        if version == 1:
            counters["n_instances"] = Study.n_instances + 1
        merged = _merge_modalities(modalities, received.modality)
        if merged != modalities:
            counters["modalities"] = merged
        past_stable = state not in (State.RECEIVING, *RESUMABLE_STATES)
        if past_stable and received.sop_class_uid not in SCOREABLE_SOP_CLASSES:
            # Kept with the study, but it cannot change the verdict: the study stays where it is.
            session.execute(
                update(Study)
                .where(Study.study_uid == study_uid)
                .values(updated_at=now, **counters)
                .execution_options(synchronize_session=False)
            )
        else:
            reopened = _touch_study(session, study_uid, state, deadline, **counters)
    _INSERT_INSTANCE.run(
        connection,
        {
            "study_uid": study_uid,
            "series_uid": received.series_uid,
            "sop_instance_uid": received.sop_instance_uid,
            "sop_class_uid": received.sop_class_uid,
            "modality": received.modality,
            "transfer_syntax": received.transfer_syntax,
            "size": received.size,
            "sha256": received.sha256,
            "path": path,
            "version": version,
            "conflict": version > 1,
            "duplicates": 0,
            "calling_ae": received.calling_ae,
            "peer": received.peer,
            "received_at": now,
        },
    )
    return RecordOutcome("conflict" if version > 1 else "stored", version, path, reopened)


def due_studies(session: Session, now: datetime | None = None) -> list[str]:
    """UIDs of RECEIVING studies whose quiet timer has run out, oldest deadline first."""
    now = now or utcnow()
    return list(
        session.scalars(
            select(Study.study_uid)
            .where(Study.state == State.RECEIVING, Study.quiet_deadline <= now)
            .order_by(Study.quiet_deadline)
        )
    )


def study_instances(session: Session, study_uid: str) -> list[Instance]:
    """Every stored instance row of a study (all versions), in receipt order."""
    return list(session.scalars(select(Instance).where(Instance.study_uid == study_uid).order_by(Instance.id)))


def latest_instances(session: Session, study_uid: str) -> list[Instance]:
    """What a study is made of now: the latest version of each SOP instance, in receipt order, without btd's
    own reports (SR, KOS) should a PACS have routed them back into the study.

    The one reading of "the study's instances" for scoring and for reporting, so the SR references exactly
    what was scored. Why btd's own documents are left out of both: a report is no evidence about the images
    (scoring it would only add a "not assessed" series to the verdict), and an SR must never cite its
    predecessor as a source image.
    """
    documents = select(Report.sr_sop_instance_uid, Report.kos_sop_instance_uid).where(Report.study_uid == study_uid)
    ours = [uid for report in session.execute(documents) for uid in report]
    rows = session.scalars(
        select(Instance)
        .where(Instance.study_uid == study_uid, Instance.sop_instance_uid.not_in([uid for uid in ours if uid]))
        .order_by(Instance.id)
    ).all()
    latest: dict[str, Instance] = {}
    for row in rows:
        if row.sop_instance_uid not in latest or row.version > latest[row.sop_instance_uid].version:
            latest[row.sop_instance_uid] = row
    return sorted(latest.values(), key=lambda r: r.id)


def mark_genuine(session: Session, study_uid: str, version: int, who: str) -> int:
    """A person says this study version is genuine: its series' reference samples may teach their scanners'
    references at once, whatever the detector said of them (worker/references.py folds them). Returns the
    number of samples marked. The caller commits."""
    result = session.execute(
        update(ReferenceSample)
        .where(
            ReferenceSample.study_uid == study_uid,
            ReferenceSample.study_version == version,
            ReferenceSample.folded_at.is_(None),
        )
        .values(marked_genuine_by=who[:128])
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def replaced_instances(session: Session, study_uid: str) -> list[tuple[str, int]]:
    """(SOP Instance UID, latest version) of each instance of the study replaced by different bytes under its
    UID, in receipt order, without btd's own reports (as `latest_instances`): the evidence the verdict and the
    SR must state (core/forensics.py)."""
    return [(row.sop_instance_uid, row.version) for row in latest_instances(session, study_uid) if row.version > 1]
