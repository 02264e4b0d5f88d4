"""The report tasks: `btd.build_report` (SCORED -> REPORTED) and `btd.deliver_report` (-> DELIVERED).

Why the database decides, not Celery: a message may arrive twice, a worker may die between sending and
recording. `build_report` reuses the reports row of the study version if one exists (document UIDs are
derived from the study version, so a rebuild yields the same SR), and writes the row in the same
transaction as SCORED -> REPORTED. `deliver_report` reads the delivery log first: a destination that
already succeeded for this report is never sent again, so a retry sends no second copy. Failures of a
destination are retried with exponential backoff (Celery retries; in-process, a timer that dispatches
the next round) and end in FAILED_DELIVERY, from which `POST /api/studies/{uid}/redeliver` restarts.
No destinations configured: the study stays REPORTED (the SR is on disk and in the database).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from core.contracts import DeliveryOutcome, State, Task, model_path
from core.db.base import utcnow
from core.db.repository import latest_instances, transition
from core.db.schema import DeliveryAttempt, Instance, Report, Study
from core.db.session import session_scope
from core.dicom.destination import Destination, parse_destination
from core.observability.logs import log_event
from core.observability.metrics import DELIVERY_ATTEMPTS, TASK_OUTCOMES
from core.queue import MAX_BACKOFF_SECONDS, backoff_seconds, dispatch
from core.settings import Settings
from worker.celery_app import app, configured_settings
from worker.correlation import study_correlation
from worker.lease import Claim, LeaseKeeper, lease_holder, lease_seconds
from worker.reports.codes import PROCEDURE_BY_MODALITY
from worker.reports.delivery import send_report
from worker.reports.evidence import evidence_reference
from worker.reports.findings import load_findings
from worker.reports.kos import build_kos, flagged_uids
from worker.reports.sr import build_sr, predecessor_reference
from worker.reports.store import read_document, write_document

log = logging.getLogger("btd.worker.reports")


# Outcomes
BUILT = "built"  # SR (+KOS) written, study REPORTED
REUSED = "reused"  # a report for this study version existed; study REPORTED
DELIVERED = "delivered"
NO_DESTINATIONS = "no_destinations"  # stays REPORTED
RETRY = "retry"
FAILED = "failed"
SKIPPED = "skipped"


# Seconds to wait for a destination's answer (association, each C-STORE) before counting it a failure.
DELIVERY_TIMEOUT_SECONDS = 30.0


class SourcesMissing(Exception):
    """Scored instances are no longer in the spool: an SR must not be built from bytes we cannot show."""


@dataclass
class TaskOutcome:
    kind: str
    detail: str | None = None


# --------------------------------------------------------------------------------------------------
# build_report


def read_sources(settings: Settings, rows: list[Instance], read_in_full: set[str]) -> list[Dataset]:
    """The scored instances as the SR and KOS cite them, in receipt order: the header (without pixels) of the
    first instance, of the first CT or MR image (a report without regions describes it in its Image Library:
    the first instance received may be a dose report or another non-image) and of those in `read_in_full`; a
    database-made stand-in for every other one (why: worker/reports/evidence.py). Every file must still be in
    the spool (SourcesMissing names how many are gone): an SR must not cite bytes we cannot show."""
    spool = Path(settings.spool_dir)
    missing = [r for r in rows if not (spool / r.path).is_file()]
    if missing or not rows:
        raise SourcesMissing(f"{len(missing)} of {len(rows)} source instance(s) missing from the spool")
    first_image = next((r for r in rows if r.modality in PROCEDURE_BY_MODALITY), rows[0])
    wanted = read_in_full | {rows[0].sop_instance_uid, first_image.sop_instance_uid}
    return [
        pydicom.dcmread(spool / r.path, stop_before_pixels=True)
        if r.sop_instance_uid in wanted
        else evidence_reference(r.study_uid, r.series_uid, r.sop_class_uid, r.sop_instance_uid, r.modality)
        for r in rows
    ]


def _previous_sr(session: Session, settings: Settings, study_uid: str, version: int) -> Dataset | None:
    previous = session.scalar(
        select(Report)
        .where(Report.study_uid == study_uid, Report.study_version < version)
        .order_by(Report.study_version.desc())
        .limit(1)
    )
    if previous is None:
        return None
    stored = read_document(settings.data_dir, previous.sr_path)
    return stored or predecessor_reference(study_uid, previous.sr_series_uid, previous.sr_sop_instance_uid)


def scoring_model_metadata(settings: Settings, weights_sha256: str | None) -> dict | None:
    """The scoring model's metadata (NAME.json beside BTD_MODEL, or the default model's), only if that file
    describes the weights that scored (same SHA-256): a report must not borrow another model's facts."""
    from models.metadata import metadata_path_for

    weights = model_path(settings.model)
    try:
        meta = json.loads(metadata_path_for(weights).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not weights_sha256 or meta.get("weights_sha256") != weights_sha256:
        return None
    return meta


def model_version(meta: dict | None, model_name: str) -> str:
    """The scoring model's version from its metadata; else the model name, the closest thing to a version
    the database keeps."""
    return str(meta["software_version"]) if meta and meta.get("software_version") else model_name


def operating_point(meta: dict | None) -> str:
    """What the SR says about how far the verdict can be trusted: the model's measured operating point."""
    summary = ((meta or {}).get("performance") or {}).get("summary")
    if summary:
        return str(summary)
    return "No measured operating point is recorded for this model: treat its verdicts as unvalidated."


def _write_report(session: Session, settings: Settings, study: Study) -> Report:
    findings = load_findings(session, study.study_uid, study.version)
    meta = scoring_model_metadata(settings, findings.model_sha256)
    findings.model_version = model_version(meta, findings.model_name)
    findings.operating_point = operating_point(meta)
    read_in_full = set(flagged_uids(findings))  # regions, flagged and replaced images: the SR and KOS read these
    sources = read_sources(settings, latest_instances(session, study.study_uid), read_in_full)
    previous = _previous_sr(session, settings, study.study_uid, study.version)
    sr = build_sr(sources, findings, previous_sr=previous)
    report = Report(
        study_uid=study.study_uid,
        study_version=study.version,
        sr_sop_instance_uid=str(sr.SOPInstanceUID),
        sr_series_uid=str(sr.SeriesInstanceUID),
        sr_path=write_document(settings.data_dir, sr),
        predecessor_sop_instance_uid=str(previous.SOPInstanceUID) if previous is not None else None,
        created_at=utcnow(),
    )
    kos = build_kos(sources, findings) if settings.kos_enabled else None
    if kos is not None:
        report.kos_sop_instance_uid = str(kos.SOPInstanceUID)
        report.kos_path = write_document(settings.data_dir, kos)
    session.add(report)
    session.flush()
    return report


def run_build_report(study_uid: str, settings: Settings, *, dispatch_next: bool = True) -> TaskOutcome:
    """Build (or reuse) the report of the study's current version and move it SCORED -> REPORTED, then
    dispatch its delivery (`dispatch_next=False`: the caller delivers, e.g. a test or a CLI)."""
    with study_correlation(settings, study_uid):
        try:
            with session_scope(settings) as session:
                study = session.scalar(select(Study).where(Study.study_uid == study_uid))
                if study is None or study.state != State.SCORED:
                    state = study.state if study else None
                    log_event(log, "report.skipped", study_uid=study_uid, state=state)
                    return TaskOutcome(SKIPPED, f"state {state}")
                existing = session.scalar(
                    select(Report).where(Report.study_uid == study_uid, Report.study_version == study.version)
                )
                report = existing or _write_report(session, settings, study)
                detail = f"report {report.sr_sop_instance_uid}" + (" (reused)" if existing else "")
                if not transition(
                    session, study_uid, State.SCORED, State.REPORTED, detail, where=[Study.version == study.version]
                ):
                    session.rollback()
                    log_event(log, "report.discarded", logging.WARNING, study_uid=study_uid, version=study.version)
                    return TaskOutcome(SKIPPED, "study changed while the report was built")
                kind = REUSED if existing else BUILT
        except OperationalError:
            raise  # the database is away: nothing was written; the task is retried
        except IntegrityError:
            # a duplicate message: another worker inserted this version's report first (same UIDs, same files)
            log_event(log, "report.skipped", study_uid=study_uid, detail="built concurrently by another worker")
            return TaskOutcome(SKIPPED, "report built concurrently by another worker")
        except Exception as exc:  # noqa: BLE001 - missing sources, unreadable headers, an SR we cannot build
            return _report_failed(settings, study_uid, exc)
        log_event(
            log,
            "report.built",
            study_uid=study_uid,
            outcome=kind,
            sr=report.sr_sop_instance_uid,
            kos=report.kos_sop_instance_uid,
        )
    if dispatch_next:
        _dispatch(Task.DELIVER_REPORT, study_uid, settings)
    return TaskOutcome(kind, report.sr_sop_instance_uid)


def _report_failed(settings: Settings, study_uid: str, exc: Exception) -> TaskOutcome:
    """No report can be built: FAILED with the reason; the verdict columns are left as they are."""
    error = f"cannot build report: {type(exc).__name__}: {exc}"[:2000]
    with session_scope(settings) as session:
        transition(session, study_uid, State.SCORED, State.FAILED, error, error=error)
    log_event(log, "report.failed", logging.ERROR, study_uid=study_uid, error=error)
    return TaskOutcome(FAILED, error)


# --------------------------------------------------------------------------------------------------
# deliver_report


def _succeeded(session: Session, report_id: int) -> set[str]:
    return set(
        session.scalars(
            select(DeliveryAttempt.destination).where(
                DeliveryAttempt.report_id == report_id, DeliveryAttempt.outcome == DeliveryOutcome.SUCCESS
            )
        )
    )


def _record_attempt(
    settings: Settings, report_id: int, destination: str, success: bool, status: int | None, error: str | None
) -> int:
    with session_scope(settings) as session:
        previous = session.scalar(
            select(func.count(DeliveryAttempt.id)).where(
                DeliveryAttempt.report_id == report_id, DeliveryAttempt.destination == destination
            )
        )
        attempt = int(previous or 0) + 1
        session.add(
            DeliveryAttempt(
                report_id=report_id,
                destination=destination,
                attempt=attempt,
                at=utcnow(),
                outcome=DeliveryOutcome.SUCCESS if success else DeliveryOutcome.FAILURE,
                dicom_status=status,
                error=error,
            )
        )
    DELIVERY_ATTEMPTS.labels(outcome=DeliveryOutcome.SUCCESS if success else DeliveryOutcome.FAILURE).inc()
    return attempt


def _current_report(session: Session, study: Study) -> Report | None:
    return session.scalar(
        select(Report).where(Report.study_uid == study.study_uid, Report.study_version == study.version)
    )


def run_deliver_report(
    study_uid: str,
    settings: Settings,
    *,
    final_attempt: bool = True,
    timeout: float = DELIVERY_TIMEOUT_SECONDS,
    retry_in: float | None = None,
    owner: str | None = None,
) -> TaskOutcome:
    """Send the current report to every destination that has not yet acknowledged it.

    The sending worker holds a lease on the REPORTED study (renewed by its heartbeat), so a duplicate
    message finds it leased and does nothing (two deliveries at once could each send before either
    recorded its success), and a worker killed mid-delivery is replaced once its lease runs out.
    `retry_in`: the countdown the caller gives its retry after a failed round, recorded as `retry_at`."""
    owner = owner or lease_holder(settings)
    with study_correlation(settings, study_uid):
        with session_scope(settings) as session:
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is None or study.state not in (State.REPORTED, State.FAILED_DELIVERY):
                state = study.state if study else None
                log_event(log, "delivery.skipped", study_uid=study_uid, state=state)
                return TaskOutcome(SKIPPED, f"state {state}")
            report = _current_report(session, study)
            if report is None:
                log_event(
                    log,
                    "delivery.skipped",
                    logging.WARNING,
                    study_uid=study_uid,
                    state=study.state,
                    detail="no report for the current version",
                )
                return TaskOutcome(SKIPPED, "no report for the current version")
            if settings.destinations and not _claim_delivery(session, settings, study, owner):
                log_event(log, "delivery.skipped", study_uid=study_uid, detail=f"leased by {study.lease_owner}")
                return TaskOutcome(SKIPPED, f"being delivered by {study.lease_owner}")
            if study.state == State.FAILED_DELIVERY:
                transition(session, study_uid, State.FAILED_DELIVERY, State.REPORTED, "delivery restarted")
            already = _succeeded(session, report.id)
            report_id, version = report.id, study.version
            paths = [Path(settings.data_dir) / p for p in (report.sr_path, report.kos_path) if p]
        if not settings.destinations:
            log_event(log, "delivery.no_destinations", study_uid=study_uid)
            return TaskOutcome(NO_DESTINATIONS, "BTD_DESTINATIONS is empty; the study stays REPORTED")
        claim = Claim(study_uid, owner, version, 0, state=State.REPORTED)
        with LeaseKeeper(settings, claim):
            failures = _deliver_pending(settings, study_uid, report_id, paths, already, timeout)
        return _finish_delivery(settings, claim, failures, final_attempt, retry_in)


def _claim_delivery(session: Session, settings: Settings, study: Study, owner: str) -> bool:
    """Lease the study for this delivery round unless a live worker holds it (a compare-and-set)."""
    now = utcnow()
    claimed = session.execute(
        update(Study)
        .where(
            Study.study_uid == study.study_uid,
            Study.state.in_((State.REPORTED, State.FAILED_DELIVERY)),
            Study.version == study.version,
            or_(Study.lease_until.is_(None), Study.lease_until < now, Study.lease_owner == owner),
        )
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease_seconds(settings)), retry_at=None)
        .execution_options(synchronize_session=False)
    )
    return claimed.rowcount == 1  # type: ignore[attr-defined]


def _deliver_pending(
    settings: Settings, study_uid: str, report_id: int, paths: list[Path], already: set[str], timeout: float
) -> dict[str, str]:
    """One association per destination not yet done; returns the failures by destination."""
    failures: dict[str, str] = {}
    missing = [p for p in paths if not p.is_file()]
    for text in settings.destinations:
        try:
            destination: Destination | None = parse_destination(text)
        except ValueError as exc:
            destination, key = None, text
            failures[key] = str(exc)
            _record_attempt(settings, report_id, key, False, None, str(exc))
            log_event(
                log,
                "delivery.attempt",
                logging.ERROR,
                study_uid=study_uid,
                destination=key,
                outcome=DeliveryOutcome.FAILURE,
                error=str(exc),
            )
            continue
        key = str(destination)
        if key in already:
            continue
        if missing:
            outcome_error = f"report file(s) missing: {', '.join(p.name for p in missing)}"
            success, status, error = False, None, outcome_error
        else:
            outcome = send_report(paths, destination, settings, timeout=timeout)
            success, status, error = outcome.success, outcome.dicom_status, outcome.error
        attempt = _record_attempt(settings, report_id, key, success, status, error)
        log_event(
            log,
            "delivery.attempt",
            logging.INFO if success else logging.WARNING,
            study_uid=study_uid,
            destination=key,
            attempt=attempt,
            outcome=DeliveryOutcome.SUCCESS if success else DeliveryOutcome.FAILURE,
            dicom_status=status,
            error=error,
        )
        if not success:
            failures[key] = error or "failed"
    return failures


def _finish_delivery(
    settings: Settings, claim: Claim, failures: dict[str, str], final_attempt: bool, retry_in: float | None
) -> TaskOutcome:
    """DELIVERED, FAILED_DELIVERY, or a retry: each releases our lease in the same UPDATE, guarded by it
    (a worker whose lease was taken over leaves the study to its successor)."""
    study_uid = claim.study_uid
    guard = [Study.version == claim.version, Study.lease_owner == claim.owner]
    release: dict[str, Any] = {"lease_owner": None, "lease_until": None}
    with session_scope(settings) as session:
        if not failures:
            transition(
                session,
                study_uid,
                State.REPORTED,
                State.DELIVERED,
                "delivered to every destination",
                where=guard,
                error=None,
                **release,
            )
            log_event(log, "delivery.done", study_uid=study_uid)
            return TaskOutcome(DELIVERED)
        summary = "; ".join(f"{d}: {e}" for d, e in failures.items())[:2000]
        if final_attempt:
            transition(
                session,
                study_uid,
                State.REPORTED,
                State.FAILED_DELIVERY,
                f"delivery failed: {summary}",
                where=guard,
                error=summary,
                **release,
            )
            log_event(log, "delivery.failed", logging.ERROR, study_uid=study_uid, error=summary)
            return TaskOutcome(FAILED, summary)
        retry_at = utcnow() + timedelta(seconds=retry_in or 0)
        session.execute(
            update(Study)
            .where(Study.study_uid == study_uid, Study.state == State.REPORTED, *guard)
            .values(retry_at=retry_at, **release)
            .execution_options(synchronize_session=False)
        )
    log_event(log, "delivery.retry", logging.WARNING, study_uid=study_uid, error=summary)
    return TaskOutcome(RETRY, summary)


def _dispatch(task: Task, study_uid: str, settings: Settings) -> None:
    """Hand the next step over by name; a failed hand-over leaves the study in a state the API shows (and
    the stability monitor dispatches it again)."""
    try:
        dispatch(task, study_uid, settings=settings)
    except Exception as exc:  # noqa: BLE001 - the study's state is durable; the step can be re-dispatched
        log_event(log, "report.dispatch_failed", logging.ERROR, study_uid=study_uid, task=task, error=str(exc))


# --------------------------------------------------------------------------------------------------
# Entry points: Celery tasks, and plain functions for the in-process executor


@app.task(
    name=Task.BUILD_REPORT.value,
    bind=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=MAX_BACKOFF_SECONDS,
    max_retries=5,
    acks_late=True,
)
def build_report_task(self: Any, study_uid: str) -> str:
    kind = run_build_report(study_uid, configured_settings()).kind
    TASK_OUTCOMES.labels(task=Task.BUILD_REPORT.value, outcome=kind).inc()
    return kind


@app.task(
    name=Task.DELIVER_REPORT.value,
    bind=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=MAX_BACKOFF_SECONDS,
    acks_late=True,
)
def deliver_report_task(self: Any, study_uid: str) -> str:
    settings = configured_settings()
    final = self.request.retries >= settings.delivery_retries
    delay = backoff_seconds(settings.delivery_backoff_seconds, self.request.retries)
    outcome = run_deliver_report(study_uid, settings, final_attempt=final, retry_in=delay)
    TASK_OUTCOMES.labels(task=Task.DELIVER_REPORT.value, outcome=outcome.kind).inc()
    if outcome.kind == RETRY:
        raise self.retry(countdown=delay, max_retries=settings.delivery_retries)
    return outcome.kind


def build_report(study_uid: str, *, settings: Settings) -> str:
    """In-process entry (no broker)."""
    kind = run_build_report(study_uid, settings).kind
    TASK_OUTCOMES.labels(task=Task.BUILD_REPORT.value, outcome=kind).inc()
    return kind


def deliver_report(study_uid: str, retries_done: int = 0, *, settings: Settings) -> str:
    """In-process entry (no broker): one delivery round; after a failure the next round is dispatched
    again after the backoff, on a timer, so the single executor thread is not blocked while a PACS is down.
    A timer lost with the process is harmless: the stability monitor re-dispatches REPORTED studies."""
    final = retries_done >= settings.delivery_retries
    delay = backoff_seconds(settings.delivery_backoff_seconds, retries_done)
    outcome = run_deliver_report(study_uid, settings, final_attempt=final, retry_in=delay)
    TASK_OUTCOMES.labels(task=Task.DELIVER_REPORT.value, outcome=outcome.kind).inc()
    if outcome.kind == RETRY:
        dispatch(Task.DELIVER_REPORT, study_uid, retries_done + 1, settings=settings, countdown=delay)
        log_event(log, "delivery.retry_scheduled", study_uid=study_uid, seconds=delay, retry=retries_done + 1)
    return outcome.kind
