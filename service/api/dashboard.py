"""The radiology-IT dashboard (server-rendered HTML under `/` and `/ui/`) and the `/metrics` route.

Why server-rendered: the pages must work inside a hospital network with no CDN and no build step, so
they are Jinja2 templates with one small vanilla script (service/static/dashboard.js) that polls for live
progress and calls the JSON API for the two actions (rescore, redeliver). Every number comes from the
database (service/api/dashboard_queries.py); patient name and ID are never loaded unless
BTD_EXPOSE_PATIENT_IDS is set.
"""

from __future__ import annotations

import logging
import re
from datetime import date, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from sqlalchemy.orm import Session

from core.contracts import ALL_STATES, FAILED_STATES, MILESTONES, VERDICTS, State
from core.db.session import session_factory
from core.observability.fleet import merged_payload, read_heartbeats
from core.observability.logs import log_event
from core.observability.metrics import (
    install_forensic_collector,
    install_stuck_collector,
    install_study_state_collector,
    metrics_payload,
)
from core.settings import Settings
from service.api import alarms, audit, forensics
from service.api import dashboard_health as health
from service.api import dashboard_queries as queries
from service.api.auth import require_view, require_view_page
from service.api.deps import get_session, get_settings, queue_depth, read_progress
from service.api.pages import PACKAGE_DIR, render
from service.api.params import MAX_FRAME, MAX_PAGE, DicomUID, clip
from service.dicom.receivers import receiver_metrics
from service.heatmap import CT_WINDOWS, RegionBox, load_residual_map, render_overlay_png

log = logging.getLogger(__name__)

STATIC_DIR = PACKAGE_DIR / "static"
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml", ".png": "image/png"}
STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\.[a-z]{2,4}$")
STATE_CHOICES = "|".join(sorted(ALL_STATES))
VERDICT_CHOICES = "|".join(sorted(VERDICTS))

router = APIRouter(tags=["dashboard"])
page_guard = [Depends(require_view_page)]
data_guard = [Depends(require_view)]


def _page(request: Request, name: str, settings: Settings, status_code: int = 200, **context: Any) -> HTMLResponse:
    return render(request, name, settings, status_code, **context)


@router.get("/", response_class=HTMLResponse, include_in_schema=False, dependencies=page_guard)
def overview_page(
    request: Request, settings: Settings = Depends(get_settings), session: Session = Depends(get_session)
) -> HTMLResponse:
    data = queries.overview(session)
    references = queries.scanner_references(session)
    session.rollback()  # end the read transaction before health checks and rendering
    return _page(
        request,
        "overview.html",
        settings,
        overview=data,
        stuck=_stuck(settings),
        depth=queue_depth(settings),
        worker=health.worker_health(settings),
        model=health.model_in_use(settings, data.model_name, data.model_sha256),
        destinations=health.destinations_view(settings, data.destinations),
        states=[s.value for s in (*MILESTONES, *FAILED_STATES, State.REJECTED)],
        references=references,
    )


@router.get("/ui/overview.json", include_in_schema=False, dependencies=data_guard)
def overview_json(settings: Settings = Depends(get_settings), session: Session = Depends(get_session)) -> JSONResponse:
    """The overview's numbers, polled by the page so the counters move without a reload."""
    data = queries.overview(session)
    return JSONResponse(
        {
            "received": data.received,
            "scored": data.scored,
            "flagged": data.flagged,
            "review": data.review,
            "failed": data.failed,
            "states": data.states,
            "queue_depth": queue_depth(settings),
            "in_progress": data.in_progress,
        }
    )


def _parse_day(value: str) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError as exc:
        raise HTTPException(422, f"date must be YYYY-MM-DD, not {clip(value)!r}") from exc


@router.get("/ui/studies", response_class=HTMLResponse, include_in_schema=False, dependencies=page_guard)
def studies_page(
    request: Request,
    state: str = Query("", pattern=f"^({STATE_CHOICES})?$"),
    verdict: str = Query("", pattern=f"^({VERDICT_CHOICES})?$"),
    day: str = Query("", alias="date", max_length=10),
    modality: str = Query("", pattern=r"^([A-Za-z]{2,16})?$"),
    page: int = Query(1, ge=1, le=MAX_PAGE),
    settings: Settings = Depends(get_settings),
    session: Session = Depends(get_session),
) -> HTMLResponse:
    filters = queries.StudyFilters(state=state, verdict=verdict, received_on=_parse_day(day), modality=modality)
    result = queries.list_studies(session, filters, page=page, with_patient=settings.expose_patient_ids)
    return _page(
        request,
        "studies.html",
        settings,
        result=result,
        filters=filters,
        query=filters.as_query(),
        states=[s.value for s in (*MILESTONES, *FAILED_STATES, State.REJECTED)],
        verdicts=[v.value for v in VERDICTS],
    )


@router.get("/ui/studies/{study_uid}", response_class=HTMLResponse, include_in_schema=False, dependencies=page_guard)
def study_page(
    request: Request,
    study_uid: DicomUID,
    settings: Settings = Depends(get_settings),
    session: Session = Depends(get_session),
) -> HTMLResponse:
    detail = queries.study_detail(session, study_uid, with_patient=settings.expose_patient_ids)
    if detail is None:
        return _page(request, "not_found.html", settings, status_code=404, study_uid=study_uid)
    session.rollback()  # end the read transaction before the audit row is written (SQLite: one writer)
    audit.record(settings, request, audit.Action.VIEW_STUDY, study_uid, detail="dashboard")
    detail["audit"] = audit.for_study(session, study_uid)
    return _page(
        request,
        "study.html",
        settings,
        d=detail,
        progress=read_progress(settings.data_dir, study_uid),
        windows=tuple(CT_WINDOWS),
    )


@router.get("/ui/studies/{study_uid}/status.json", include_in_schema=False, dependencies=data_guard)
def study_status(
    study_uid: DicomUID, settings: Settings = Depends(get_settings), session: Session = Depends(get_session)
) -> JSONResponse:
    """The pollable part of a study page: state, verdict and scoring progress."""
    status = queries.study_status(session, study_uid)
    if status is None:
        raise HTTPException(404, "unknown study")
    progress = read_progress(settings.data_dir, study_uid)
    status["progress"] = progress
    return JSONResponse(_jsonable(status))


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return {k: convert(v) for k, v in data.items()}


def _inside(root: Path, relative: str) -> Path:
    """`root/relative`, refusing anything that escapes `root` (paths come from the database, but still)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise HTTPException(404, "file outside its folder")
    return path


@router.get(
    "/ui/studies/{study_uid}/instances/{sop_instance_uid}/overlay.png",
    include_in_schema=False,
    dependencies=data_guard,
)
def overlay_png(
    request: Request,
    study_uid: DicomUID,
    sop_instance_uid: DicomUID,
    frame: int | None = Query(None, ge=1, le=MAX_FRAME),
    window: str = Query("lung", pattern=f"^({'|'.join(CT_WINDOWS)})$"),
    settings: Settings = Depends(get_settings),
    session: Session = Depends(get_session),
) -> Response:
    """The slice from the spool, windowed, with the residual heat map and the regions drawn over it."""
    source = queries.overlay_source(session, study_uid, sop_instance_uid, frame)
    session.rollback()  # end the read transaction before the slow part (SQLite: it holds the write lock)
    if source is None:
        raise HTTPException(404, "unknown instance")
    audit.record(settings, request, audit.Action.VIEW_IMAGE, study_uid, sop_instance_uid)
    dicom_path = _inside(Path(settings.spool_dir), source.spool_path)
    if not dicom_path.is_file():
        raise HTTPException(410, "the spool no longer holds this instance")
    residual = load_residual_map(_inside(Path(settings.data_dir), source.map_path)) if source.map_path else None
    regions = [
        RegionBox(r["x0"], r["y0"], r["x1"], r["y1"], r["score"], r["outline"])
        for r in source.regions
        if source.frame is None or r["frame"] in (None, source.frame)
    ]
    try:
        png = render_overlay_png(dicom_path, residual, regions, frame=source.frame, window=window)
    except Exception as exc:  # an undecodable slice is shown as an error, never a broken page
        log_event(
            log,
            "dashboard.overlay_failed",
            logging.WARNING,
            study_uid=study_uid,
            sop_instance_uid=sop_instance_uid,
            error=type(exc).__name__,
        )
        raise HTTPException(422, f"cannot render this slice: {type(exc).__name__}") from exc
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@router.get("/ui/destinations/echo.json", include_in_schema=False, dependencies=data_guard)
def echo_destinations(settings: Settings = Depends(get_settings)) -> JSONResponse:
    """C-ECHO every configured destination now (on demand from the overview; results cached briefly)."""
    return JSONResponse({"destinations": health.echo_all(settings)})


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    """The dashboard's own CSS and JS (no CDN: hospital networks are closed)."""
    if not STATIC_NAME.match(name):
        raise HTTPException(404, "no such file")
    path = STATIC_DIR / name
    if path.suffix not in STATIC_TYPES or not path.is_file():
        raise HTTPException(404, "no such file")
    return FileResponse(path, media_type=STATIC_TYPES[path.suffix], headers={"Cache-Control": "max-age=300"})


def _stuck(settings: Settings) -> alarms.StuckReport | None:
    """Stuck studies for the overview's alarm; None if they cannot be counted now (the page still renders)."""
    try:
        return alarms.stuck_report(settings)
    except Exception:  # noqa: BLE001 - the database or broker is away; /readyz names it
        return None


def _count_states(settings: Settings) -> dict[str, int]:
    with session_factory(settings)() as session:
        return queries.count_states(session)


def _count_forensics(settings: Settings) -> dict[str, int]:
    with session_factory(settings)() as session:
        return forensics.count_forensics(session)


@router.get("/metrics", include_in_schema=False, dependencies=data_guard)
def metrics(settings: Settings = Depends(get_settings)) -> Response:
    """Prometheus exposition: the process's counters and histograms, studies by state and stuck studies from
    the db, and in Celery mode every live worker's own metrics (from its heartbeat) with a `worker` label, as
    are those of the receiving processes (`worker="receiver-<n>"`)."""
    install_study_state_collector(lambda: _count_states(settings))
    install_forensic_collector(lambda: _count_forensics(settings))
    install_stuck_collector(lambda: alarms.stuck_report(settings).counts)
    payload, content_type = metrics_payload()
    others = receiver_metrics()  # receiving processes beside this gateway (BTD_DICOM_PROCESSES > 1)
    if settings.broker_url:
        others += read_heartbeats(settings) or []
    if others:
        payload = merged_payload(others)  # the same registry, the other processes merged in
    return Response(payload, media_type=content_type)
