"""Reports over REST: the reports of a study with their delivery log, and the redeliver action.

Why redeliver only moves FAILED_DELIVERY -> REPORTED and dispatches: the delivery task decides what to
send from the delivery log (destinations that already acknowledged the report are skipped), so a
redelivery never sends a second copy to a PACS that has one.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import State, Task
from core.db.repository import transition
from core.db.schema import DeliveryAttempt, Report, Study
from core.observability.logs import log_event
from core.queue import dispatch
from core.settings import Settings
from service.api import audit
from service.api.auth import require_act, require_view
from service.api.deps import get_session, get_settings
from service.api.params import DicomUID

log = logging.getLogger("btd.api.reports")

router = APIRouter(prefix="/api", tags=["reports"], dependencies=[Depends(require_view)])


class DeliveryAttemptOut(BaseModel):
    destination: str
    attempt: int
    at: datetime
    outcome: str
    dicom_status: int | None
    error: str | None


class ReportOut(BaseModel):
    study_version: int
    sr_sop_instance_uid: str
    sr_series_uid: str
    kos_sop_instance_uid: str | None
    predecessor_sop_instance_uid: str | None
    created_at: datetime
    deliveries: list[DeliveryAttemptOut]


class RedeliverAccepted(BaseModel):
    study_uid: str
    state: str
    dispatched: str


def _study_or_404(session: Session, study_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
    return study


@router.get("/studies/{study_uid}/reports", response_model=list[ReportOut], responses={404: {}})
def list_reports(
    request: Request,
    study_uid: DicomUID,
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> list[ReportOut]:
    """Every report built for the study (one per verdict version), oldest first, with its delivery log."""
    _study_or_404(session, study_uid)
    reports = session.scalars(select(Report).where(Report.study_uid == study_uid).order_by(Report.id)).all()
    out = []
    for report in reports:
        attempts = session.scalars(
            select(DeliveryAttempt).where(DeliveryAttempt.report_id == report.id).order_by(DeliveryAttempt.id)
        ).all()
        fields: dict[str, Any] = {
            name: getattr(report, name)
            for name in ("study_version", "sr_sop_instance_uid", "sr_series_uid", "kos_sop_instance_uid",
                         "predecessor_sop_instance_uid", "created_at")
        }
        deliveries = [
            DeliveryAttemptOut(destination=a.destination, attempt=a.attempt, at=a.at, outcome=a.outcome,
                               dicom_status=a.dicom_status, error=a.error)
            for a in attempts
        ]
        out.append(ReportOut(**fields, deliveries=deliveries))
    session.rollback()  # end the read transaction before the audit row is written (SQLite: one writer)
    audit.record(settings, request, audit.Action.VIEW_REPORTS, study_uid)
    return out


@router.post(
    "/studies/{study_uid}/redeliver",
    response_model=RedeliverAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_act)],
    responses={401: {}, 403: {}, 404: {}, 409: {"description": "the study is not in FAILED_DELIVERY"}},
)
def redeliver(
    request: Request,
    study_uid: DicomUID,
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> RedeliverAccepted:
    """Retry the delivery of a study whose report could not be delivered (FAILED_DELIVERY -> REPORTED)."""
    study = _study_or_404(session, study_uid)
    if study.state != State.FAILED_DELIVERY:
        raise HTTPException(status.HTTP_409_CONFLICT, f"study is {study.state}; only FAILED_DELIVERY is redelivered")
    if not transition(session, study_uid, State.FAILED_DELIVERY, State.REPORTED, "redelivery requested over the API"):
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, "the study changed state meanwhile; try again")
    session.commit()
    audit.record(settings, request, audit.Action.REDELIVER, study_uid)
    try:
        dispatch(Task.DELIVER_REPORT, study_uid, settings=settings)
    except Exception as exc:  # noqa: BLE001 - the study is REPORTED in the db; say the hand-over failed
        log_event(log, "api.redeliver_dispatch_failed", logging.ERROR, study_uid=study_uid, error=str(exc))
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"study reported but not dispatched: {exc}") from exc
    log_event(log, "api.redeliver", study_uid=study_uid)
    return RedeliverAccepted(study_uid=study_uid, state=State.REPORTED, dispatched=Task.DELIVER_REPORT.value)
