"""The stability monitor: decides when a study is complete and hands it to scoring.

DICOM has no "end of study" message, so completion is a guess: a study is complete once no instance has
arrived for BTD_STABLE_SECONDS (its `quiet_deadline`, restarted by every instance, kept in the database
so the guess survives a restart). Every BTD_MONITOR_INTERVAL seconds the monitor moves each RECEIVING
study whose deadline passed to STABLE, and each STABLE study to QUEUED (dispatching `btd.score_study`),
or to REJECTED when it holds no CT or MR image to score. Both steps are compare-and-set, so several
gateways sharing a database queue a study once.

Recovery: a study whose timer ran out while the gateway was down is simply due at the first pass. A
dispatch that fails (broker down) puts the study back to STABLE, so the next pass tries again. Without a
broker (embedded mode) the in-process queue died with the last process, so at start the monitor
re-dispatches studies left QUEUED, SCORED (report not built) and
REPORTED (not delivered), and every pass re-dispatches a SCORING study whose lease expired (its
worker thread died with the process); the tasks are idempotent, guarded by the state machine. With a broker the
messages live in Redis; a study QUEUED for longer than BTD_VISIBILITY_TIMEOUT is re-dispatched in case
its message was lost (a duplicate message finds the study already claimed and does nothing).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from core import queue
from core.contracts import SCOREABLE_SOP_CLASSES, State, Task
from core.db import repository
from core.db.base import utcnow
from core.db.schema import Instance, Study
from core.db.session import session_factory
from core.observability.logs import log_event
from core.settings import Settings

log = logging.getLogger("btd.stability")

Dispatcher = Callable[..., None]


def has_scoreable_instance(session: Session, study_uid: str) -> bool:
    return bool(
        session.scalar(
            select(
                exists().where(
                    Instance.study_uid == study_uid, Instance.sop_class_uid.in_(SCOREABLE_SOP_CLASSES)
                )
            )
        )
    )


class StabilityMonitor:
    """A background thread running `run_once` every `settings.monitor_interval` seconds."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session] | None = None,
        dispatch: Dispatcher | None = None,
        *,
        embedded: bool | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions or session_factory(settings)
        self.dispatch = dispatch or (lambda name, *args: queue.dispatch(name, *args, settings=settings))
        self.embedded = (not settings.broker_url) if embedded is None else embedded
        self._stop = threading.Event()
        self._lease_redispatched: dict[str, datetime] = {}
        self._thread = threading.Thread(target=self._loop, name="btd-stability", daemon=True)

    def start(self) -> StabilityMonitor:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            self.recover()
        except Exception:
            log.exception("stability.recover_failed")
        while True:
            try:
                self.run_once()
            except Exception:  # the database may be down for a while; keep trying
                log.exception("stability.pass_failed")
            if self._stop.wait(self.settings.monitor_interval):
                return

    # One pass ----------------------------------------------------------------------------------

    def run_once(self, now: datetime | None = None) -> list[str]:
        """Complete every quiet study; return the UIDs dispatched for scoring."""
        now = now or utcnow()
        with self.sessions() as session:
            due = repository.due_studies(session, now)
        for study_uid in due:
            with self.sessions() as session:
                if repository.transition(
                    session,
                    study_uid,
                    State.RECEIVING,
                    State.STABLE,
                    f"quiet for {self.settings.stable_seconds:g} s",
                    where=[Study.quiet_deadline <= now],
                ):
                    session.commit()
                    log_event(log, "study.stable", study_uid=study_uid)
        with self.sessions() as session:
            stable = list(session.scalars(select(Study.study_uid).where(Study.state == State.STABLE)))
        queued = [uid for uid in stable if self._queue(uid, now)]
        if self.embedded:
            self._redispatch_expired_leases(now)
        else:
            self._redispatch_stale_queued(now)
        return queued

    def _redispatch_expired_leases(self, now: datetime) -> None:
        """Embedded mode: a SCORING study whose lease ran out lost its worker thread; score it again once
        per expired lease (the task takes over an expired lease; a live one makes it return at once)."""
        with self.sessions() as session:
            expired = list(
                session.execute(
                    select(Study.study_uid, Study.lease_until).where(
                        Study.state == State.SCORING, Study.lease_until.is_not(None), Study.lease_until < now
                    )
                )
            )
        for study_uid, lease_until in expired:
            if self._lease_redispatched.get(study_uid) == lease_until:
                continue
            self._lease_redispatched[study_uid] = lease_until
            log_event(log, "study.lease_expired", logging.WARNING, study_uid=study_uid)
            self._send(study_uid, Task.SCORE_STUDY)

    def _queue(self, study_uid: str, now: datetime) -> bool:
        with self.sessions() as session:
            if not has_scoreable_instance(session, study_uid):
                reason = "no CT or MR image instance to score"
                if repository.transition(session, study_uid, State.STABLE, State.REJECTED, reason, error=reason):
                    session.commit()
                    log_event(log, "study.rejected", study_uid=study_uid, reason=reason)
                return False
            if not repository.transition(session, study_uid, State.STABLE, State.QUEUED, queued_at=now):
                return False
            session.commit()
        return self._send(study_uid, Task.SCORE_STUDY, requeue_on_failure=True)

    def _send(self, study_uid: str, task: str, *, requeue_on_failure: bool = False) -> bool:
        try:
            self.dispatch(task, study_uid)
        except Exception as exc:
            log_event(log, "study.dispatch_failed", logging.ERROR, study_uid=study_uid, task=task, error=str(exc))
            if requeue_on_failure:
                with self.sessions() as session:
                    if repository.transition(
                        session, study_uid, State.QUEUED, State.STABLE, f"dispatch failed: {exc}"[:500]
                    ):
                        session.commit()
            return False
        log_event(log, "study.dispatched", study_uid=study_uid, task=task)
        return True

    def _redispatch_stale_queued(self, now: datetime) -> None:
        cutoff = now - timedelta(seconds=self.settings.visibility_timeout)
        with self.sessions() as session:
            stale = list(
                session.execute(
                    select(Study.study_uid, Study.queued_at).where(
                        Study.state == State.QUEUED, Study.queued_at.is_not(None), Study.queued_at < cutoff
                    )
                )
            )
        for study_uid, queued_at in stale:
            with self.sessions() as session:
                claimed = session.execute(
                    update(Study)
                    .where(Study.study_uid == study_uid, Study.state == State.QUEUED, Study.queued_at == queued_at)
                    .values(queued_at=now)
                    .execution_options(synchronize_session=False)
                )
                session.commit()
            if claimed.rowcount == 1:  # type: ignore[attr-defined]
                log_event(log, "study.requeued_stale", study_uid=study_uid)
                self._send(study_uid, Task.SCORE_STUDY)

    # Start-up recovery ---------------------------------------------------------------------------

    def recover(self, now: datetime | None = None) -> dict[str, list[str]]:
        """Embedded mode: re-dispatch the work an in-process queue lost with the previous process."""
        if not self.embedded:
            return {}
        now = now or utcnow()
        with self.sessions() as session:
            # Without a broker only this process scores, so a lease still running belongs to the previous
            # process, which is gone (stopped mid-scoring, or crashed): end it now rather than letting the
            # study wait out up to half the visibility timeout. The next pass then re-dispatches it.
            orphaned = session.execute(
                update(Study)
                .where(Study.state == State.SCORING, Study.lease_until.is_not(None), Study.lease_until > now)
                .values(lease_until=now)
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            session.commit()
        if orphaned:
            log_event(log, "study.leases_released", count=orphaned, reason="scoring process is gone")
        plan: dict[str, tuple[Any, str]] = {
            Task.SCORE_STUDY: (
                or_(Study.state == State.QUEUED, and_(Study.state == State.SCORING, Study.lease_until.is_(None))),
                "queued, or scoring without a lease (expired leases are picked up by every pass)",
            ),
            Task.BUILD_REPORT: (Study.state == State.SCORED, "scored, report not built"),
            Task.DELIVER_REPORT: (Study.state == State.REPORTED, "reported, not delivered"),
        }
        sent: dict[str, list[str]] = {}
        for task, (condition, why) in plan.items():
            with self.sessions() as session:
                uids = list(session.scalars(select(Study.study_uid).where(condition).order_by(Study.updated_at)))
            for study_uid in uids:
                log_event(log, "study.recovered", study_uid=study_uid, task=task, reason=why)
                self._send(study_uid, task)
            sent[task] = uids
        return sent
