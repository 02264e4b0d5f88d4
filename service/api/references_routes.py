"""Scanner references over REST: what the site has learnt per scanner and kernel, and "this study is genuine".

Why a person's word counts: a false alarm on a genuine study is exactly what a reference must learn from,
but the detector never learns from a flagged study on its own (an attacker's study must not become the
norm). Marking a study genuine is an act (operator role); the worker folds its samples at the next fold.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.repository import get_study, mark_genuine
from core.db.schema import ScannerReference
from core.observability.logs import log_event
from core.settings import Settings
from service.api import audit
from service.api.auth import Principal, require_act, require_view
from service.api.deps import get_session, get_settings
from service.api.params import DicomUID
from service.api.schemas import GenuineAccepted, ScannerReferenceOut

log = logging.getLogger("btd.api.references")

router = APIRouter(prefix="/api", tags=["references"], dependencies=[Depends(require_view)])


@router.get("/references", response_model=list[ScannerReferenceOut])
def list_references(session: Session = Depends(get_session)) -> list[ScannerReferenceOut]:
    """Every scanner reference learnt from this site's genuine traffic, with its provenance."""
    order = (ScannerReference.manufacturer, ScannerReference.model, ScannerReference.kernel, ScannerReference.band)
    rows = session.scalars(select(ScannerReference).order_by(*order)).all()
    return [ScannerReferenceOut.model_validate(row, from_attributes=True) for row in rows]


@router.post(
    "/studies/{study_uid}/genuine",
    response_model=GenuineAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses={401: {}, 403: {}, 404: {}, 409: {"description": "the study has not been scored"}},
)
def mark_study_genuine(
    request: Request,
    study_uid: DicomUID,
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(require_act),
) -> GenuineAccepted:
    """Say that the study's current version is genuine, so its series teach their scanners' references."""
    study = get_study(session, study_uid)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
    marked = mark_genuine(session, study_uid, study.version, principal.name)
    if not marked:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, "no scored series of this version waits to teach a reference")
    session.commit()
    audit.record(settings, request, audit.Action.MARK_GENUINE, study_uid, principal=principal)
    log_event(log, "api.marked_genuine", study_uid=study_uid, version=study.version, samples=marked)
    return GenuineAccepted(study_uid=study_uid, version=study.version, samples_marked=marked)
