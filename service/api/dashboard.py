"""The radiology-IT dashboard (server-rendered HTML under `/` and `/ui/`) and the `/metrics` route.

Why server-rendered: the pages must work inside a hospital network with no CDN and no build step, so
they are Jinja2 templates with one small vanilla script (service/static/dashboard.js) that polls for live
progress and calls the JSON API for the two actions (rescore, redeliver). Every number comes from the
database (service/api/dashboard_queries.py); patient name and ID are never loaded unless
BTD_EXPOSE_PATIENT_IDS is set.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from core.contracts import FAILED_STATES, MILESTONES, VERDICTS, State
from core.db.session import session_factory
from core.observability.fleet import merged_payload, read_heartbeats
from core.observability.logs import log_event
from core.observability.metrics import install_stuck_collector, install_study_state_collector, metrics_payload
from core.settings import Settings
from service.api import alarms
from service.api import dashboard_health as health
from service.api import dashboard_queries as queries
from service.api.deps import get_session, get_settings, queue_depth, read_progress
from service.heatmap import CT_WINDOWS, RegionBox, load_residual_map, render_overlay_png

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml", ".png": "image/png"}

templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
router = APIRouter(tags=["dashboard"])


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return "—"
    if value.tzinfo is None:  # reflected tables (reports area) on SQLite come back naive; they hold UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt_score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _fmt_bytes(value: int | None) -> str:
    size = float(value or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


templates.env.filters["time"] = _fmt_time
templates.env.filters["score"] = _fmt_score
templates.env.filters["bytes"] = _fmt_bytes


def _page(request: Request, name: str, settings: Settings, status_code: int = 200, **context: Any) -> HTMLResponse:
    base = {"token_required": bool(settings.api_token), "expose_patient_ids": settings.expose_patient_ids}
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def overview_page(
    request: Request, settings: Settings = Depends(get_settings), session: Session = Depends(get_session)
) -> HTMLResponse:
    data = queries.overview(session)
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
    )


@router.get("/ui/overview.json", include_in_schema=False)
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
        raise HTTPException(422, f"date must be YYYY-MM-DD, not {value!r}") from exc


@router.get("/ui/studies", response_class=HTMLResponse, include_in_schema=False)
def studies_page(
    request: Request,
    state: str = "",
    verdict: str = "",
    day: str = Query("", alias="date"),
    modality: str = "",
    page: int = Query(1, ge=1),
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


@router.get("/ui/studies/{study_uid}", response_class=HTMLResponse, include_in_schema=False)
def study_page(
    request: Request,
    study_uid: str,
    settings: Settings = Depends(get_settings),
    session: Session = Depends(get_session),
) -> HTMLResponse:
    detail = queries.study_detail(session, study_uid, with_patient=settings.expose_patient_ids)
    if detail is None:
        return _page(request, "not_found.html", settings, status_code=404, study_uid=study_uid)
    return _page(
        request,
        "study.html",
        settings,
        d=detail,
        progress=read_progress(settings.data_dir, study_uid),
        windows=tuple(CT_WINDOWS),
    )


@router.get("/ui/studies/{study_uid}/status.json", include_in_schema=False)
def study_status(
    study_uid: str, settings: Settings = Depends(get_settings), session: Session = Depends(get_session)
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


@router.get("/ui/studies/{study_uid}/instances/{sop_instance_uid}/overlay.png", include_in_schema=False)
def overlay_png(
    study_uid: str,
    sop_instance_uid: str,
    frame: int | None = Query(None, ge=1),
    window: str = Query("lung"),
    settings: Settings = Depends(get_settings),
    session: Session = Depends(get_session),
) -> Response:
    """The slice from the spool, windowed, with the residual heat map and the regions drawn over it."""
    source = queries.overlay_source(session, study_uid, sop_instance_uid, frame)
    session.rollback()  # end the read transaction before the slow part (SQLite: it holds the write lock)
    if source is None:
        raise HTTPException(404, "unknown instance")
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


@router.get("/ui/destinations/echo.json", include_in_schema=False)
def echo_destinations(settings: Settings = Depends(get_settings)) -> JSONResponse:
    """C-ECHO every configured destination now (on demand from the overview; results cached briefly)."""
    return JSONResponse({"destinations": health.echo_all(settings)})


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    """The dashboard's own CSS and JS (no CDN: hospital networks are closed)."""
    path = STATIC_DIR / name
    if "/" in name or path.suffix not in STATIC_TYPES or not path.is_file():
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


@router.get("/metrics", include_in_schema=False)
def metrics(settings: Settings = Depends(get_settings)) -> Response:
    """Prometheus exposition: the process's counters and histograms, studies by state and stuck studies from
    the db, and in Celery mode every live worker's own metrics (from its heartbeat) with a `worker` label."""
    install_study_state_collector(lambda: _count_states(settings))
    install_stuck_collector(lambda: alarms.stuck_report(settings).counts)
    payload, content_type = metrics_payload()
    if settings.broker_url:
        payload = merged_payload(read_heartbeats(settings) or [])  # the same registry, workers merged in
    return Response(payload, media_type=content_type)
