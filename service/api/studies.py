"""Studies over REST: list and filter, one study in detail, rescore, and counts for a status board.

Why the API reads the tables directly but changes state only through `repository.transition`: reads
need joins and paging the repository has no reason to know, while every state change must stay a
compare-and-set that leaves a study_events row (docs/architecture.md).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from sqlalchemy import String, exists, func, literal, select
from sqlalchemy.orm import Session

from core.contracts import ALL_STATES, RESCORABLE_STATES, VERDICTS, State, Task, Verdict
from core.db.base import utcnow
from core.db.repository import new_version_values, transition
from core.db.schema import (
    DeliveryAttempt,
    Instance,
    InstanceResult,
    Region,
    Report,
    SeriesResult,
    Study,
    StudyEvent,
)
from core.observability.logs import log_event
from core.queue import dispatch
from core.settings import Settings
from service.api import audit
from service.api.auth import require_act, require_view
from service.api.deps import get_session, get_settings, queue_depth, read_progress
from service.api.forensics import count_forensics, instance_history, study_counts
from service.api.params import MAX_OFFSET, DicomUID
from service.api.schemas import (
    InstanceResultOut,
    Progress,
    RegionOut,
    RescoreAccepted,
    SeriesResultOut,
    Stats,
    StudyDetail,
    StudyEventOut,
    StudyList,
    StudySummary,
)

log = logging.getLogger("btd.api")

router = APIRouter(prefix="/api", tags=["studies"], dependencies=[Depends(require_view)])


def _summary_fields(study: Study, settings: Settings) -> dict[str, Any]:
    data: dict[str, Any] = {
        "study_uid": study.study_uid,
        "state": study.state,
        "state_since": study.state_since,
        "version": study.version,
        "verdict": study.verdict,
        "score": study.score,
        "modalities": study.modalities,
        "n_instances": study.n_instances,
        "attempts": study.attempts,
        "error": study.error,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "created_at": study.created_at,
        "updated_at": study.updated_at,
    }
    if settings.expose_patient_ids:
        data["patient_id"] = study.patient_id
        data["patient_name"] = study.patient_name
    return data


def _get_study_or_404(session: Session, study_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown study {study_uid}")
    return study


@router.get("/studies", response_model=StudyList, response_model_exclude_none=False)
def list_studies(
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    state: State | None = None,
    verdict: Verdict | None = None,
    since: datetime | None = Query(None, description="studies first received at or after this time (ISO 8601)"),
    modality: str | None = Query(None, pattern=r"^[A-Za-z]{2,16}$"),
    conflict: bool | None = Query(
        None, description="true: only studies with an instance replaced by different bytes under its UID; false: none"
    ),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> StudyList:
    """Newest first. `since` without a zone is taken as UTC."""
    conditions = []
    if conflict is not None:
        replaced = exists().where(Instance.study_uid == Study.study_uid, Instance.conflict.is_(True))
        conditions.append(replaced if conflict else ~replaced)
    if state:
        conditions.append(Study.state == state)
    if verdict:
        conditions.append(Study.verdict == verdict)
    if since:
        conditions.append(Study.created_at >= (since if since.tzinfo else since.replace(tzinfo=utcnow().tzinfo)))
    if modality:
        # `modalities` is a sorted comma-separated set ("CT,SR"): match one whole element.
        padded = literal(",", String) + func.coalesce(Study.modalities, "") + literal(",", String)
        conditions.append(padded.like(f"%,{modality.upper()},%"))
    total = session.scalar(select(func.count()).select_from(Study).where(*conditions)) or 0
    rows = session.scalars(
        select(Study).where(*conditions).order_by(Study.created_at.desc(), Study.id.desc()).limit(limit).offset(offset)
    ).all()
    counts = study_counts(session, [s.study_uid for s in rows])
    items = [StudySummary(**_summary_fields(s, settings), **counts[s.study_uid].summary()) for s in rows]
    return StudyList(items=items, total=total, limit=limit, offset=offset)


def _series_results(session: Session, study: Study) -> tuple[int | None, list[SeriesResultOut]]:
    """Results of the newest study version that has any (a reopened study shows its previous verdict's
    series until it is scored again; `results_version` says which)."""
    version = session.scalar(
        select(func.max(SeriesResult.study_version)).where(SeriesResult.study_uid == study.study_uid)
    )
    if version is None:
        return None, []
    series_rows = session.scalars(
        select(SeriesResult)
        .where(SeriesResult.study_uid == study.study_uid, SeriesResult.study_version == version)
        .order_by(SeriesResult.id)
    ).all()
    series_ids = [s.id for s in series_rows]
    instance_rows = session.scalars(
        select(InstanceResult).where(InstanceResult.series_result_id.in_(series_ids)).order_by(InstanceResult.id)
    ).all()
    region_rows = session.scalars(
        select(Region).where(Region.instance_result_id.in_([i.id for i in instance_rows])).order_by(Region.id)
    ).all()
    regions_by_instance: dict[int, list[RegionOut]] = {}
    for r in region_rows:
        regions_by_instance.setdefault(r.instance_result_id, []).append(
            RegionOut(x0=r.x0, y0=r.y0, x1=r.x1, y1=r.y1, score=r.score, outline=r.outline, cue=r.cue)
        )
    instances_by_series: dict[int, list[InstanceResultOut]] = {}
    for i in instance_rows:
        instances_by_series.setdefault(i.series_result_id, []).append(
            InstanceResultOut(
                sop_instance_uid=i.sop_instance_uid,
                frame=i.frame,
                score=i.score,
                verdict=i.verdict,
                reason=i.reason,
                map_path=i.map_path,
                regions=regions_by_instance.get(i.id, []),
                cue_scores=i.cue_scores,
            )
        )
    out = [
        SeriesResultOut(
            series_uid=s.series_uid,
            study_version=s.study_version,
            modality=s.modality,
            verdict=s.verdict,
            score=s.score,
            reason=s.reason,
            n_instances=s.n_instances,
            n_assessed=s.n_assessed,
            model_name=s.model_name,
            model_sha256=s.model_sha256,
            created_at=s.created_at,
            instances=instances_by_series.get(s.id, []),
            cues=s.cues,
            reference=s.reference,
            scanner_key=s.scanner_key,
        )
        for s in series_rows
    ]
    return version, out


def _row(row: Any) -> dict[str, Any]:
    """Every column of an ORM row by its column name (what the detail's `reports` has always listed)."""
    return {column.name: getattr(row, column.key) for column in row.__table__.columns}


def _reports(session: Session, study_uid: str) -> list[dict[str, Any]]:
    """Reports of the study, oldest first, each with its delivery attempts."""
    reports = session.scalars(select(Report).where(Report.study_uid == study_uid).order_by(Report.id)).all()
    attempts = session.scalars(
        select(DeliveryAttempt)
        .where(DeliveryAttempt.report_id.in_([r.id for r in reports]))
        .order_by(DeliveryAttempt.id)
    ).all()
    out = []
    for report in reports:
        entry = _row(report)
        entry["deliveries"] = [_row(a) for a in attempts if a.report_id == report.id]
        out.append(entry)
    return out


@router.get("/studies/{study_uid}", response_model=StudyDetail, responses={404: {}})
def get_study(
    request: Request,
    study_uid: DicomUID,
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> StudyDetail:
    """The study, its history, results and reports, and what arrived: every instance with each version's
    SHA-256, size, time and calling AE, identical resends (`duplicates`) and replacements by different bytes
    under the same UID (`conflict`), summed up in `forensics`."""
    study = _get_study_or_404(session, study_uid)
    events = session.scalars(
        select(StudyEvent).where(StudyEvent.study_uid == study_uid).order_by(StudyEvent.at, StudyEvent.id)
    ).all()
    history = [StudyEventOut(at=e.at, from_state=e.from_state, to_state=e.to_state, detail=e.detail) for e in events]
    errors = [e.detail for e in events if e.to_state == State.FAILED and e.detail]
    errors += [e.detail for e in events if e.detail and e.detail.startswith("retry after error")]
    if study.error and study.error not in errors:
        errors.append(study.error)
    results_version, series = _series_results(session, study)
    progress = read_progress(settings.data_dir, study_uid) if study.state == State.SCORING else None
    counts = study_counts(session, [study_uid])[study_uid]
    instances = instance_history(session, study_uid)
    reports = _reports(session, study_uid)
    # Everything shown of the study is taken from the rows read above, before the rollback: a rollback expires
    # the ORM objects, and reading `study` after it loads the row again, possibly newer than the history read
    # with it (seen in CI: state SCORED with its verdict, and a history that ended at SCORING).
    summary = _summary_fields(study, settings)
    lease_owner, lease_until, queued_at = study.lease_owner, study.lease_until, study.queued_at
    session.rollback()  # end the read transaction before the audit row is written (SQLite: one writer)
    audit.record(settings, request, audit.Action.VIEW_STUDY, study_uid, detail="api")
    return StudyDetail(
        **summary,
        **counts.summary(),
        forensics=counts.forensics(),
        instances=instances,
        lease_owner=lease_owner,
        lease_until=lease_until,
        queued_at=queued_at,
        progress=Progress(**progress) if progress else None,
        results_version=results_version,
        history=history,
        series=series,
        errors=errors,
        reports=reports,
    )


@router.post(
    "/studies/{study_uid}/rescore",
    response_model=RescoreAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_act)],
    responses={401: {}, 403: {}, 404: {}, 409: {"description": "the study is being received, queued or scored"}},
)
def rescore_study(
    request: Request,
    study_uid: DicomUID,
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> RescoreAccepted:
    """Send a finished or failed study back to scoring, as a new version of its verdict.

    Why a new version: the study's earlier verdict may already be in the PACS as an SR; the new one
    must be a distinct result that its SR can name the old one as predecessor of.
    """
    study = _get_study_or_404(session, study_uid)
    current = study.state
    if current not in RESCORABLE_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"study is {current}; it can be rescored once finished")
    moved = transition(
        session,
        study_uid,
        current,
        State.QUEUED,
        "rescore requested over the API",
        queued_at=utcnow(),
        **new_version_values(),
    )
    if not moved:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, "the study changed state meanwhile; try again")
    session.commit()
    audit.record(settings, request, audit.Action.RESCORE, study_uid)
    try:
        dispatch(Task.SCORE_STUDY, study_uid, settings=settings)
    except Exception as exc:  # noqa: BLE001 - the study is QUEUED in the db; say that the hand-over failed
        log_event(log, "api.rescore_dispatch_failed", logging.ERROR, study_uid=study_uid, error=str(exc))
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"study queued but not dispatched: {exc}") from exc
    session.expire_all()
    study = _get_study_or_404(session, study_uid)
    log_event(log, "api.rescore", study_uid=study_uid, version=study.version)
    return RescoreAccepted(
        study_uid=study_uid, state=study.state, version=study.version, dispatched=Task.SCORE_STUDY.value
    )


@router.get("/stats", response_model=Stats)
def stats(session: Session = Depends(get_session), settings: Settings = Depends(get_settings)) -> Stats:
    by_state = dict.fromkeys(ALL_STATES, 0)
    for state, count in session.execute(select(Study.state, func.count()).group_by(Study.state)):
        by_state[state] = count
    by_verdict = dict.fromkeys(VERDICTS, 0)
    for verdict, count in session.execute(
        select(Study.verdict, func.count()).where(Study.verdict.is_not(None)).group_by(Study.verdict)
    ):
        by_verdict[verdict] = count
    forensic = count_forensics(session)
    return Stats(
        **forensic,
        by_state=by_state,
        by_verdict=by_verdict,
        total=sum(by_state.values()),
        queue_depth=queue_depth(settings),
        queue_mode="celery" if settings.broker_url else "in-process",
    )
