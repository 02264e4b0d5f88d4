"""Read-only queries behind the dashboard: what radiology IT sees, straight from the database.

Why a module of its own: the routes in `dashboard.py` only turn these plain dictionaries into HTML, and
the queries can be tested against a real database without HTTP. Nothing here writes; actions (rescore,
redeliver) go through the JSON API. Patient name and ID are only read when the caller asks for them
(`BTD_EXPOSE_PATIENT_IDS`), so a template cannot show what was never loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from core.contracts import FAILED_STATES, MILESTONES, WAITING_STATES, State, Verdict, cue_words
from core.db.schema import (
    DeliveryAttempt,
    Instance,
    InstanceResult,
    Region,
    Report,
    ScannerReference,
    SeriesResult,
    Study,
    StudyEvent,
)

PAGE_SIZE = 25


def start_of_day(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def count_states(session: Session) -> dict[str, int]:
    """Studies per current state."""
    rows = session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
    return {state: int(n) for state, n in rows}


def _studies_reaching(session: Session, states: tuple[str, ...], since: datetime) -> int:
    """Distinct studies that entered one of `states` since `since` (from the event log, so a study
    that went on to DELIVERED still counts as scored today)."""
    query = select(func.count(func.distinct(StudyEvent.study_uid))).where(
        StudyEvent.to_state.in_(states), StudyEvent.at >= since
    )
    return int(session.execute(query).scalar_one())


@dataclass
class Overview:
    day: date
    received: int
    scored: int
    flagged: int
    review: int
    failed: int
    states: dict[str, int]
    queue_depth: int
    in_progress: int
    model_name: str | None
    model_sha256: str | None
    destinations: list[dict[str, Any]] = field(default_factory=list)
    recent: list[dict[str, Any]] = field(default_factory=list)


def overview(session: Session, now: datetime | None = None) -> Overview:
    """Today's counts (UTC day), the state of the queue and the model that scored last."""
    now = now or datetime.now(UTC)
    since = start_of_day(now.date())
    received = int(session.execute(select(func.count()).where(Study.created_at >= since)).scalar_one())

    def scored_today_with(verdict: str) -> int:
        query = (
            select(func.count(func.distinct(StudyEvent.study_uid)))
            .join(Study, Study.study_uid == StudyEvent.study_uid)
            .where(StudyEvent.to_state == State.SCORED, StudyEvent.at >= since, Study.verdict == verdict)
        )
        return int(session.execute(query).scalar_one())

    states = count_states(session)
    last_model = session.execute(
        select(SeriesResult.model_name, SeriesResult.model_sha256).order_by(SeriesResult.id.desc()).limit(1)
    ).first()
    recent = session.execute(
        select(Study.study_uid, Study.state, Study.verdict, Study.modalities, Study.n_instances, Study.updated_at)
        .order_by(Study.updated_at.desc())
        .limit(10)
    ).all()
    return Overview(
        day=now.date(),
        received=received,
        scored=_studies_reaching(session, (State.SCORED,), since),
        flagged=scored_today_with(Verdict.SUSPICIOUS),
        review=scored_today_with(Verdict.REVIEW),
        failed=_studies_reaching(session, FAILED_STATES, since),
        states=states,
        queue_depth=sum(states.get(s, 0) for s in WAITING_STATES),
        in_progress=states.get(State.SCORING, 0),
        model_name=last_model.model_name if last_model else None,
        model_sha256=last_model.model_sha256 if last_model else None,
        destinations=destination_health(session),
        recent=[dict(row._mapping) for row in recent],
    )


def destination_health(session: Session) -> list[dict[str, Any]]:
    """The last delivery attempt to each destination: its outcome, time and error."""
    latest = (
        select(DeliveryAttempt.destination, func.max(DeliveryAttempt.id).label("id"))
        .group_by(DeliveryAttempt.destination)
        .subquery()
    )
    query = (
        select(
            DeliveryAttempt.destination,
            DeliveryAttempt.outcome,
            DeliveryAttempt.at,
            DeliveryAttempt.dicom_status,
            DeliveryAttempt.error,
        )
        .join(latest, latest.c.id == DeliveryAttempt.id)
        .order_by(DeliveryAttempt.destination)
    )
    return [dict(row._mapping) for row in session.execute(query).all()]


@dataclass(frozen=True)
class StudyFilters:
    """What the study list can be narrowed by; empty strings mean "any"."""

    state: str = ""
    verdict: str = ""
    received_on: date | None = None
    modality: str = ""

    def as_query(self) -> dict[str, str]:
        values = {"state": self.state, "verdict": self.verdict, "modality": self.modality}
        values["date"] = self.received_on.isoformat() if self.received_on else ""
        return {k: v for k, v in values.items() if v}


@dataclass
class StudyPage:
    rows: list[dict[str, Any]]
    total: int
    page: int
    pages: int


def list_studies(
    session: Session, filters: StudyFilters, page: int = 1, per_page: int = PAGE_SIZE, with_patient: bool = False
) -> StudyPage:
    """One page of studies, newest received first."""
    columns = [
        Study.study_uid,
        Study.state,
        Study.state_since,
        Study.verdict,
        Study.score,
        Study.modalities,
        Study.n_instances,
        Study.study_date,
        Study.study_description,
        Study.created_at,
        Study.error,
    ]
    if with_patient:
        columns += [Study.patient_id, Study.patient_name]
    conditions = []
    if filters.state:
        conditions.append(Study.state == filters.state)
    if filters.verdict:
        conditions.append(Study.verdict == filters.verdict)
    if filters.modality:
        conditions.append(Study.modalities.contains(filters.modality))
    if filters.received_on:
        day = start_of_day(filters.received_on)
        conditions.append(Study.created_at >= day)
        conditions.append(Study.created_at < day + timedelta(days=1))
    total = int(session.execute(select(func.count()).select_from(Study).where(*conditions)).scalar_one())
    pages = max(1, -(-total // per_page))
    page = min(max(1, page), pages)
    query = (
        select(*columns)
        .where(*conditions)
        .order_by(Study.created_at.desc(), Study.id.desc())
        .offset((page - 1) * per_page)
        .limit(per_page)
    )
    rows = [dict(row._mapping) for row in session.execute(query).all()]
    return StudyPage(rows=rows, total=total, page=page, pages=pages)


def _study_columns(with_patient: bool) -> list[Any]:
    hidden = set() if with_patient else {"patient_id", "patient_name"}
    return [column for column in Study.__table__.columns if column.name not in hidden]


def study_status(session: Session, study_uid: str) -> dict[str, Any] | None:
    """The small, pollable part of a study: state, since when, verdict, and how far scoring got."""
    row = session.execute(
        select(Study.state, Study.state_since, Study.verdict, Study.score, Study.version, Study.n_instances,
               Study.attempts, Study.error).where(Study.study_uid == study_uid)
    ).first()
    if row is None:
        return None
    status = dict(row._mapping)
    scored = session.execute(
        select(func.count(InstanceResult.id))
        .join(SeriesResult, SeriesResult.id == InstanceResult.series_result_id)
        .where(SeriesResult.study_uid == study_uid, SeriesResult.study_version == row.version)
    ).scalar_one()
    status["instances_scored"] = int(scored)
    status["n_events"] = int(
        session.execute(select(func.count()).where(StudyEvent.study_uid == study_uid)).scalar_one()
    )
    return status


def study_detail(session: Session, study_uid: str, with_patient: bool = False) -> dict[str, Any] | None:
    """Everything the study page shows: the study, its history, series results with their suspicious
    slices and regions, reports and delivery attempts."""
    study_row = session.execute(select(*_study_columns(with_patient)).where(Study.study_uid == study_uid)).first()
    if study_row is None:
        return None
    study = dict(study_row._mapping)
    events = [
        dict(row._mapping)
        for row in session.execute(
            select(StudyEvent.at, StudyEvent.from_state, StudyEvent.to_state, StudyEvent.detail)
            .where(StudyEvent.study_uid == study_uid)
            .order_by(StudyEvent.at, StudyEvent.id)
        ).all()
    ]
    version = results_version(session, study_uid)
    return {
        "study": study,
        "events": events,
        "milestones": milestones(events),
        "errors": errors_of(events, study.get("error")),
        "received_series": received_series(session, study_uid),
        "results_version": version,
        "series": series_results(session, study_uid, version) if version is not None else [],
        "reports": reports(session, study_uid),
        "deliveries": delivery_attempts(session, study_uid),
    }


def results_version(session: Session, study_uid: str) -> int | None:
    """The newest study version that has results: after a rescore the previous verdict stays visible
    until the new one is written."""
    return session.execute(
        select(func.max(SeriesResult.study_version)).where(SeriesResult.study_uid == study_uid)
    ).scalar_one()


def errors_of(events: list[Mapping[str, Any]], current: str | None) -> list[dict[str, Any]]:
    """Every error the study met, oldest first: failed steps and retried ones (from the event log), and
    the study's current error if the log does not already hold it."""
    found = [
        {"at": e["at"], "state": e["to_state"], "detail": e["detail"]}
        for e in events
        if e["detail"] and (e["to_state"] in FAILED_STATES or "error" in e["detail"].lower())
    ]
    if current and all(current != f["detail"] for f in found):
        found.append({"at": None, "state": "current", "detail": current})
    return found


def milestones(events: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """When the study entered each milestone state in its current pass (None if not yet).

    Entering a milestone forgets the later ones: after a rescore (DELIVERED -> QUEUED) or a reopening
    (-> RECEIVING) the old "scored" and "delivered" times belong to the previous version, not this one.
    """
    last: dict[str, datetime] = {}
    for event in events:
        state = event["to_state"]
        if state not in MILESTONES:
            continue
        for later in MILESTONES[MILESTONES.index(state) + 1 :]:
            last.pop(later, None)
        last[state] = event["at"]
    return [{"state": state, "at": last.get(state)} for state in MILESTONES]


def received_series(session: Session, study_uid: str) -> list[dict[str, Any]]:
    """What arrived, per series: instance count, bytes, conflicts and duplicates."""
    query = (
        select(
            Instance.series_uid,
            Instance.modality,
            func.count(Instance.id).label("n_instances"),
            func.sum(Instance.size).label("bytes"),
            func.sum(Instance.duplicates).label("duplicates"),
            func.sum(case((Instance.conflict, 1), else_=0)).label("conflicts"),
            func.max(Instance.received_at).label("last_received"),
        )
        .where(Instance.study_uid == study_uid)
        .group_by(Instance.series_uid, Instance.modality)
        .order_by(Instance.series_uid)
    )
    return [dict(row._mapping) for row in session.execute(query).all()]


def series_results(session: Session, study_uid: str, version: int) -> list[dict[str, Any]]:
    """The current version's series verdicts; each carries its suspicious instances and their regions."""
    series = [
        dict(row._mapping)
        for row in session.execute(
            select(
                SeriesResult.id,
                SeriesResult.series_uid,
                SeriesResult.modality,
                SeriesResult.verdict,
                SeriesResult.score,
                SeriesResult.reason,
                SeriesResult.n_instances,
                SeriesResult.n_assessed,
                SeriesResult.model_name,
                SeriesResult.created_at,
                SeriesResult.cues,
                SeriesResult.reference,
            )
            .where(SeriesResult.study_uid == study_uid, SeriesResult.study_version == version)
            .order_by(SeriesResult.id)
        ).all()
    ]
    for entry in series:
        entry["suspicious"] = suspicious_instances(session, entry["id"])
        entry.update(cue_view(entry.pop("cues") or [], entry.pop("reference"), entry["n_assessed"]))
    return series


def cue_view(cues: list[dict[str, Any]], reference: dict[str, Any] | None, n_assessed: int) -> dict[str, Any]:
    """What a study page says of the forensic cues of a series: which fired, which could not be used and
    why, and what the series was judged against (nothing to say for a model without cues)."""
    if not cues:
        return {"cues_fired": [], "cues_unused": [], "judged_against": None}
    if reference:
        against = f"reference {reference.get('label')} ({reference.get('n_slices')} slices)"
    else:
        against = f"its own series ({n_assessed} slices)"
    return {
        "cues_fired": [cue_words(c.get("name")) for c in cues if c.get("used") and c.get("fired")],
        "cues_unused": [(cue_words(c.get("name")), c.get("reason") or "") for c in cues if not c.get("used")],
        "judged_against": against,
    }


def scanner_references(session: Session) -> list[dict[str, Any]]:
    """The site's learnt references, newest update first, with their provenance (no reference data)."""
    columns = (
        ScannerReference.manufacturer,
        ScannerReference.model,
        ScannerReference.kernel,
        ScannerReference.band,
        ScannerReference.n_slices,
        ScannerReference.n_series,
        ScannerReference.source,
        ScannerReference.updated_at,
    )
    query = select(*columns).order_by(ScannerReference.updated_at.desc())
    return [dict(row._mapping) for row in session.execute(query).all()]


def suspicious_instances(session: Session, series_result_id: int) -> list[dict[str, Any]]:
    """Suspicious slices of one series result, most suspicious first, with their regions."""
    rows = session.execute(
        select(InstanceResult.id, InstanceResult.sop_instance_uid, InstanceResult.frame, InstanceResult.score,
               InstanceResult.map_path)
        .where(InstanceResult.series_result_id == series_result_id, InstanceResult.verdict == Verdict.SUSPICIOUS)
        .order_by(InstanceResult.score.desc())
    ).all()
    result = []
    for row in rows:
        entry = dict(row._mapping)
        entry["regions"] = regions_of(session, row.id)
        result.append(entry)
    return result


def regions_of(session: Session, instance_result_id: int) -> list[dict[str, Any]]:
    query = (
        select(Region.x0, Region.y0, Region.x1, Region.y1, Region.score, Region.outline, Region.frame, Region.cue)
        .where(Region.instance_result_id == instance_result_id)
        .order_by(Region.score.desc())
    )
    return [dict(row._mapping) for row in session.execute(query).all()]


@dataclass
class OverlaySource:
    """What the overlay PNG is made of: the spool file, the residual map and the regions."""

    spool_path: str
    modality: str | None
    map_path: str | None
    frame: int | None
    regions: list[dict[str, Any]]


def overlay_source(session: Session, study_uid: str, sop_instance_uid: str, frame: int | None) -> OverlaySource | None:
    """The latest received version of the instance and, for the study's current version, its result."""
    instance = session.execute(
        select(Instance.path, Instance.modality)
        .where(Instance.study_uid == study_uid, Instance.sop_instance_uid == sop_instance_uid)
        .order_by(Instance.version.desc())
        .limit(1)
    ).first()
    if instance is None:
        return None
    version = results_version(session, study_uid)
    result_query = (
        select(InstanceResult.id, InstanceResult.map_path, InstanceResult.frame)
        .join(SeriesResult, SeriesResult.id == InstanceResult.series_result_id)
        .where(
            SeriesResult.study_uid == study_uid,
            SeriesResult.study_version == version,
            InstanceResult.sop_instance_uid == sop_instance_uid,
        )
        .order_by(InstanceResult.id.desc())
    )
    if frame is not None:
        result_query = result_query.where(InstanceResult.frame == frame)
    result = session.execute(result_query.limit(1)).first()
    return OverlaySource(
        spool_path=instance.path,
        modality=instance.modality,
        map_path=result.map_path if result else None,
        frame=frame if frame is not None else (result.frame if result else None),
        regions=regions_of(session, result.id) if result else [],
    )


def _columns(table: Any) -> list[Any]:
    return list(table.__table__.columns)


def reports(session: Session, study_uid: str) -> list[dict[str, Any]]:
    """The study's reports (one per verdict version), oldest first."""
    query = select(*_columns(Report)).where(Report.study_uid == study_uid).order_by(Report.id)
    return [dict(row._mapping) for row in session.execute(query).all()]


def delivery_attempts(session: Session, study_uid: str) -> list[dict[str, Any]]:
    """Every delivery attempt of the study's reports, oldest first, with the report it sent."""
    query = (
        select(*_columns(DeliveryAttempt), Report.study_version, Report.sr_sop_instance_uid)
        .join(Report, Report.id == DeliveryAttempt.report_id)
        .where(Report.study_uid == study_uid)
        .order_by(DeliveryAttempt.at, DeliveryAttempt.id)
    )
    return [dict(row._mapping) for row in session.execute(query).all()]
