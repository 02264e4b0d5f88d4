"""The scoring task `btd.score_study`: its Celery entry, its in-process entry, and the work they share.

Why the state machine, not Celery, decides whether to work: a Redis message can be delivered twice (a
re-delivery after the visibility timeout, a requeue after a killed worker, the gateway's monitor sending
again a step whose lease ran out: core/liveness.py), so the task first claims the
study with a compare-and-set QUEUED -> SCORING (or takes over a SCORING study whose lease ran out: its
worker died), and writes its results in the same transaction as SCORING -> SCORED guarded by its own
lease and the study version. A duplicate finds the study SCORING under a live lease, or SCORED, and
does nothing; a worker that lost its lease (or whose study was reopened by a new instance while it
scored) finds its final compare-and-set refused, rolls back, and its results are discarded: the study
is scored again by whoever holds it now (or, once quiet, as its new version).

Errors: a missing or altered spool file cannot be fixed by retrying: FAILED at once. Anything else is
retried with exponential backoff (the study goes back to QUEUED, so the retry claims it like any other
delivery); after the last retry the study is FAILED with the error and its attempt count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.contracts import State, Task
from core.db.base import utcnow
from core.db.repository import latest_instances, replaced_instances, transition
from core.db.schema import InstanceResult, Region, SeriesResult, Study
from core.db.session import session_scope
from core.forensics import replacement_reason, verdict_with_replacements
from core.observability.logs import log_event
from core.observability.metrics import QUEUE_WAIT_SECONDS, TASK_OUTCOMES
from core.queue import MAX_BACKOFF_SECONDS, backoff_seconds, dispatch
from core.settings import Settings
from worker import pipeline
from worker.celery_app import app, configured_settings
from worker.correlation import study_correlation
from worker.lease import Claim, LeaseKeeper, LeaseLostError, lease_holder, lease_seconds, renew_lease, worker_id
from worker.references import fold_samples, record_samples, site_references

__all__ = ["Claim", "LeaseKeeper", "LeaseLostError", "lease_seconds", "renew_lease", "worker_id"]

log = logging.getLogger("btd.worker.tasks")


# Outcomes of one delivery of the scoring task.
SCORED = "scored"  # results stored, study SCORED
SKIPPED = "skipped"  # nothing to do: not QUEUED, already scored, or unknown study
BUSY = "busy"  # another worker holds a live lease on it
DISCARDED = "discarded"  # scored, but the study was reopened or taken over meanwhile: results dropped
FAILED = "failed"  # study FAILED
RETRY = "retry"  # study back to QUEUED; try again later


@dataclass
class ScoreOutcome:
    kind: str
    detail: str | None = None
    retry_in: float | None = None  # BUSY: seconds until the other worker's lease runs out


# --------------------------------------------------------------------------------------------------
# Claim, renew, release


def claim_study(session: Session, study_uid: str, owner: str, settings: Settings) -> Claim | ScoreOutcome:
    """QUEUED -> SCORING, or take over a SCORING study whose lease expired; else say why not."""
    now = utcnow()
    lease = {"lease_owner": owner, "lease_until": now + timedelta(seconds=lease_seconds(settings))}
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        return ScoreOutcome(SKIPPED, "unknown study")
    queued_at = study.queued_at
    if transition(
        session, study_uid, State.QUEUED, State.SCORING, f"claimed by {owner}", attempts=Study.attempts + 1, **lease
    ):
        if queued_at is not None:
            QUEUE_WAIT_SECONDS.observe(max(0.0, (now - queued_at).total_seconds()))
    elif (lost := _give_up_after_lost_workers(session, study, owner, now, settings)) is not None:
        return lost
    elif transition(
        session,
        study_uid,
        State.SCORING,
        State.SCORING,
        f"lease of {study.lease_owner} expired; taken over by {owner}",
        where=[or_(Study.lease_until.is_(None), Study.lease_until < now, Study.lease_owner == owner)],
        attempts=Study.attempts + 1,
        **lease,
    ):
        pass
    else:
        session.expire_all()
        current = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if current is not None and current.state == State.SCORING and current.lease_until is not None:
            return ScoreOutcome(BUSY, f"leased by {current.lease_owner}", (current.lease_until - now).total_seconds())
        return ScoreOutcome(SKIPPED, f"state {current.state if current else None}")
    session.expire_all()
    claimed = session.scalar(select(Study).where(Study.study_uid == study_uid))
    assert claimed is not None
    return Claim(study_uid, owner, claimed.version, claimed.attempts)


def _give_up_after_lost_workers(
    session: Session, study: Study, owner: str, now: Any, settings: Settings
) -> ScoreOutcome | None:
    """A study whose workers keep dying on it (killed for memory, say) must end FAILED, not loop forever.

    Each take-over counts an attempt; once the attempts are used up the study goes SCORING -> FAILED
    instead of being taken over again. Returns None when a take-over may go ahead.
    """
    limit = settings.score_retries + 1
    if study.state != State.SCORING or study.attempts < limit:
        return None
    expired = [or_(Study.lease_until.is_(None), Study.lease_until < now)]
    error = f"worker lost while scoring, {study.attempts} times (killed, e.g. out of memory?)"
    if transition(
        session,
        study.study_uid,
        State.SCORING,
        State.FAILED,
        f"failed: {error}",
        where=expired,
        error=error,
        lease_owner=None,
        lease_until=None,
    ):
        log_event(log, "score.failed", logging.ERROR, study_uid=study.study_uid, error=error, owner=owner)
        return ScoreOutcome(FAILED, error)
    return None


def _ours(claim: Claim) -> list[Any]:
    return [Study.lease_owner == claim.owner, Study.version == claim.version]


def _release(
    settings: Settings, claim: Claim, new_state: str, detail: str, error: str, retry_in: float | None = None
) -> bool:
    """Give the study up (FAILED, or back to QUEUED for a retry due in `retry_in` seconds: the monitor
    does not take a retry waiting on its countdown for a lost message)."""
    now = utcnow()
    queued = {"queued_at": now, "retry_at": now + timedelta(seconds=retry_in or 0)}
    with session_scope(settings) as session:
        return transition(
            session,
            claim.study_uid,
            State.SCORING,
            new_state,
            detail,
            where=_ours(claim),
            error=error,
            lease_owner=None,
            lease_until=None,
            **(queued if new_state == State.QUEUED else {}),
        )


# --------------------------------------------------------------------------------------------------
# Inputs and results in the database


def load_series_inputs(session: Session, settings: Settings, study_uid: str) -> list[pipeline.SeriesInput]:
    """The study's instances (`repository.latest_instances`), grouped by series in receipt order."""
    series: dict[str, pipeline.SeriesInput] = {}
    spool = Path(settings.spool_dir)
    for row in latest_instances(session, study_uid):
        item = series.setdefault(row.series_uid, pipeline.SeriesInput(row.series_uid, row.modality))
        item.files.append(pipeline.SpoolFile(row.sop_instance_uid, spool / row.path, row.sha256))
    return list(series.values())


def store_results(session: Session, claim: Claim, result: pipeline.StudyScore) -> None:
    """Replace this study version's results (a re-run of the same version leaves one set, not two)."""
    old_ids = select(SeriesResult.id).where(
        SeriesResult.study_uid == claim.study_uid, SeriesResult.study_version == claim.version
    )
    old_instance_ids = select(InstanceResult.id).where(InstanceResult.series_result_id.in_(old_ids))
    session.execute(delete(Region).where(Region.instance_result_id.in_(old_instance_ids)))
    session.execute(delete(InstanceResult).where(InstanceResult.series_result_id.in_(old_ids)))
    session.execute(
        delete(SeriesResult).where(
            SeriesResult.study_uid == claim.study_uid, SeriesResult.study_version == claim.version
        )
    )
    for scored in result.series:
        res = scored.result
        series_row = SeriesResult(
            study_uid=claim.study_uid,
            study_version=claim.version,
            series_uid=scored.series_uid,
            modality=getattr(res, "modality", None) or scored.modality,
            verdict=res.verdict,
            score=_finite(res.score),
            reason=res.reason,
            n_instances=len(res.instances),
            n_assessed=res.n_assessed,
            model_name=result.model_name or getattr(res, "model", None),
            model_sha256=result.model_sha256,
            cues=[cue.to_dict() for cue in getattr(res, "cues", None) or []] or None,
            reference=getattr(res, "reference", None),
            scanner_key=getattr(res, "scanner_key", None),
        )
        session.add(series_row)
        session.flush()
        for inst in res.instances:
            inst_row = InstanceResult(
                series_result_id=series_row.id,
                sop_instance_uid=inst.sop_instance_uid,
                frame=inst.frame,
                score=_finite(inst.score),
                verdict=inst.verdict,
                reason=inst.reason,
                map_path=scored.map_paths.get((inst.sop_instance_uid, inst.frame)),
                cue_scores=_finite_scores(getattr(inst, "cue_scores", None)),
            )
            session.add(inst_row)
            session.flush()
            for region in inst.regions or []:
                session.add(
                    Region(
                        instance_result_id=inst_row.id,
                        sop_instance_uid=inst.sop_instance_uid,
                        frame=inst.frame,
                        x0=int(region.x0),
                        y0=int(region.y0),
                        x1=int(region.x1),
                        y1=int(region.y1),
                        score=_finite(region.score),
                        outline=[[float(x), float(y)] for x, y in (region.outline or [])],
                        cue=getattr(region, "cue", None),
                    )
                )
    session.flush()


def _finite_scores(scores: dict[str, Any] | None) -> dict[str, float] | None:
    """A slice's calibrated cue scores as JSON (a non-finite score is dropped, as JSON cannot hold it)."""
    kept = {cue: v for cue, value in (scores or {}).items() if (v := _finite(value)) is not None}
    return kept or None


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if value == value and value not in (float("inf"), float("-inf")) else None


# --------------------------------------------------------------------------------------------------
# One delivery of btd.score_study


def run_score_study(
    study_uid: str,
    settings: Settings,
    *,
    final_attempt: bool = True,
    owner: str | None = None,
    dispatch_next: bool = True,
    retry_in: float | None = None,
) -> ScoreOutcome:
    """Do (or decline) the scoring of one study; never raises for the study's own faults.

    `dispatch_next=False` leaves the study SCORED without asking for its report (tests of this step).
    `retry_in`: the countdown the caller will give its retry, recorded with the study (`retry_at`).

    Database errors while claiming propagate (the caller retries the message: nothing was done yet).
    """
    owner = owner or lease_holder(settings)
    with study_correlation(settings, study_uid):
        with session_scope(settings) as session:
            claimed = claim_study(session, study_uid, owner, settings)
        if isinstance(claimed, ScoreOutcome):
            log_event(log, "score.declined", study_uid=study_uid, outcome=claimed.kind, detail=claimed.detail)
            return claimed
        log_event(log, "score.claimed", study_uid=study_uid, version=claimed.version, attempt=claimed.attempts)
        try:
            outcome = _score_claimed(settings, claimed)
        except pipeline.PermanentScoringError as exc:
            error = str(exc)
            _release(settings, claimed, State.FAILED, f"failed: {error}", f"{error} (attempt {claimed.attempts})")
            log_event(log, "score.failed", logging.ERROR, study_uid=study_uid, error=error, attempt=claimed.attempts)
            return ScoreOutcome(FAILED, error)
        except Exception as exc:  # noqa: BLE001 - the study's error is recorded; the worker lives on
            error = f"{type(exc).__name__}: {exc}"[:2000]
            if final_attempt:
                _release(
                    settings,
                    claimed,
                    State.FAILED,
                    f"failed after {claimed.attempts} attempts: {error}",
                    f"{error} (attempt {claimed.attempts})",
                )
                log_event(
                    log, "score.failed", logging.ERROR, study_uid=study_uid, error=error, attempt=claimed.attempts
                )
                return ScoreOutcome(FAILED, error)
            _release(settings, claimed, State.QUEUED, f"retry after error: {error}", error, retry_in)
            log_event(log, "score.retry", logging.WARNING, study_uid=study_uid, error=error, attempt=claimed.attempts)
            return ScoreOutcome(RETRY, error)
        finally:
            pipeline.clear_progress(settings.data_dir, study_uid)
        if outcome.kind == SCORED and dispatch_next:
            _dispatch_report(study_uid, settings)
        return outcome


def _score_claimed(settings: Settings, claim: Claim) -> ScoreOutcome:
    with session_scope(settings) as session:
        series = load_series_inputs(session, settings, claim.study_uid)
    pipeline.verify_spool_files(series)
    detector = pipeline.get_detector(settings)

    def on_progress(done: int, total: int) -> None:
        if keeper.lost:
            raise LeaseLostError("lease lost while scoring (taken over, or the study was reopened)")
        pipeline.write_progress(settings.data_dir, claim.study_uid, done, total)

    with session_scope(settings) as session:
        references = site_references(session)
    keeper = LeaseKeeper(settings, claim).start()
    try:
        result = pipeline.score_study_files(
            detector,
            claim.study_uid,
            series,
            settings.data_dir,
            on_progress,
            references=references,
            series_in_parallel=settings.series_in_parallel,
        )
    except LeaseLostError as exc:
        log_event(log, "score.discarded", logging.WARNING, study_uid=claim.study_uid, version=claim.version)
        return ScoreOutcome(DISCARDED, str(exc))
    finally:
        keeper.stop()
    with session_scope(settings) as session:
        store_results(session, claim, result)
        # An instance replaced under its UID is evidence in itself: never a silent pass (core/forensics.py).
        n_replaced = len(replaced_instances(session, claim.study_uid))
        verdict = verdict_with_replacements(result.verdict, n_replaced)
        raised = ""
        if verdict != result.verdict:
            raised = f" (raised from {result.verdict}: {replacement_reason(n_replaced)})"
        finished = transition(
            session,
            claim.study_uid,
            State.SCORING,
            State.SCORED,
            f"verdict {verdict}, score {result.score}{raised}",
            where=_ours(claim),
            verdict=verdict,
            score=_finite(result.score),
            error=None,
            lease_owner=None,
            lease_until=None,
        )
        if not finished:
            session.rollback()
            log_event(log, "score.discarded", logging.WARNING, study_uid=claim.study_uid, version=claim.version)
            return ScoreOutcome(DISCARDED, "study reopened or lease lost while scoring; results discarded")
        record_samples(session, claim.study_uid, claim.version, [s.result for s in result.series])
    _fold_references(settings)
    log_event(log, "score.done", study_uid=claim.study_uid, verdict=verdict, score=result.score, replaced=n_replaced)
    return ScoreOutcome(SCORED, verdict)


def _fold_references(settings: Settings) -> None:
    """Let quiet (or genuine-marked) studies teach their scanners' references; a failure here costs only a
    later fold, never the study's result, which is already committed."""
    try:
        with session_scope(settings) as session:
            refitted = fold_samples(session, settings)
        if refitted:
            log_event(log, "references.folded", references=refitted)
    except Exception as exc:  # noqa: BLE001 - the next scored study folds again
        log_event(log, "references.fold_failed", logging.WARNING, error=str(exc))


def _dispatch_report(study_uid: str, settings: Settings) -> None:
    """Hand the study to its report step; SCORED is durable, so a failure here loses no result (the
    stability monitor dispatches studies left SCORED again)."""
    try:
        dispatch(Task.BUILD_REPORT, study_uid, settings=settings)
    except Exception as exc:  # noqa: BLE001 - the study stays SCORED and visible; a report can be rebuilt
        log_event(log, "report.dispatch_failed", logging.ERROR, study_uid=study_uid, error=str(exc))


# --------------------------------------------------------------------------------------------------
# Entry points: a Celery task, and a plain function for the in-process executor


@app.task(
    name=Task.SCORE_STUDY.value,
    bind=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=MAX_BACKOFF_SECONDS,
    acks_late=True,
)
def score_study_task(self: Any, study_uid: str) -> str:
    """Celery entry: the state machine decides; Celery only carries retries and re-checks."""
    settings = configured_settings()
    final = self.request.retries >= settings.score_retries
    countdown = backoff_seconds(settings.score_backoff_seconds, self.request.retries)
    outcome = run_score_study(study_uid, settings, final_attempt=final, retry_in=countdown)
    TASK_OUTCOMES.labels(task=Task.SCORE_STUDY.value, outcome=outcome.kind).inc()
    if outcome.kind == RETRY:
        raise self.retry(countdown=countdown, max_retries=settings.score_retries)
    # BUSY: another worker holds a live lease; this message is a duplicate and is acknowledged. Should that
    # worker die, its lease runs out and the gateway's monitor dispatches the study again (core/liveness.py):
    # nothing here needs to schedule a look later, so duplicates never multiply.
    return outcome.kind


def score_study(study_uid: str, retries_done: int = 0, *, settings: Settings) -> str:
    """In-process entry (no broker): one attempt; a retry is dispatched again after the backoff, on a
    timer, so the executor's single thread never sleeps while other studies wait."""
    final = retries_done >= settings.score_retries
    delay = backoff_seconds(settings.score_backoff_seconds, retries_done)
    outcome = run_score_study(study_uid, settings, final_attempt=final, retry_in=delay)
    TASK_OUTCOMES.labels(task=Task.SCORE_STUDY.value, outcome=outcome.kind).inc()
    if outcome.kind == RETRY:
        dispatch(Task.SCORE_STUDY, study_uid, retries_done + 1, settings=settings, countdown=delay)
    return outcome.kind
