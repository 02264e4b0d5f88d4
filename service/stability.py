"""The stability monitor: decides when a study is complete and hands it to scoring.

DICOM has no "end of study" message, so completion is a guess: a study is complete once no instance has
arrived for BTD_STABLE_SECONDS (its `quiet_deadline`, restarted by every instance, kept in the database
so the guess survives a restart). Every BTD_MONITOR_INTERVAL seconds the monitor moves each RECEIVING
study whose deadline passed to STABLE, and each STABLE study to QUEUED (dispatching `btd.score_study`),
or to REJECTED when it holds no CT or MR image to score. Both steps are compare-and-set, so several
gateways sharing a database queue a study once.

Recovery: a study whose timer ran out while the gateway was down is simply due at the first pass. A
dispatch that fails (broker down) puts the study back to STABLE, so the next pass tries again.

No study is ever stuck, in either mode: every pass also sweeps the states that wait on a message
(QUEUED, SCORING, SCORED, REPORTED) and dispatches a step's task again when the step is overdue by the
deadlines of core/liveness.py: its message is neither waiting in the queue nor held under a live lease
(lost with a broker restart, a dispatch that failed while the broker was down, a worker killed mid-step).
Each re-dispatch is a compare-and-set on the row's `dispatched_at`, so several gateways sharing a database
send it once, and a step whose message is still in the queue is never duplicated. The tasks are
idempotent, guarded by the state machine: a duplicate that finds its work done does nothing.

Without a broker (embedded mode) the in-process queue died with the last process, so at start the monitor
also ends any lease (scoring, delivery) left by it and re-dispatches studies left QUEUED, SCORED (report
not built) and REPORTED (not delivered) at once, without waiting for their deadlines.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from core import liveness, queue
from core.contracts import SCOREABLE_SOP_CLASSES, State, Task
from core.db import repository
from core.db.base import utcnow
from core.db.schema import Instance, Study
from core.db.session import session_factory
from core.observability.logs import log_event
from core.settings import Settings

log = logging.getLogger("btd.stability")

Dispatcher = Callable[..., None]
WaitingLookup = Callable[[], liveness.Waiting]


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
        waiting: WaitingLookup | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions or session_factory(settings)
        self.dispatch = dispatch or (lambda name, *args: queue.dispatch(name, *args, settings=settings))
        self.waiting = waiting or (lambda: queue.waiting_messages(settings))
        self.embedded = (not settings.broker_url) if embedded is None else embedded
        self._stop = threading.Event()
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
        self.sweep(now)
        return queued

    def sweep(self, now: datetime | None = None) -> list[tuple[str, str]]:
        """Dispatch again every step that is overdue (core.liveness); return the (task, study) sent.

        The queues are read only when some step would be overdue were its message gone, so an idle pass
        costs one query and no broker round trip."""
        now = now or utcnow()
        with self.sessions() as session:
            steps = liveness.load_steps(session, liveness.STEP_TASKS_STATES)
        candidates = [s for s in steps if liveness.overdue(s, now, self.settings, waiting=set())]
        if not candidates:
            return []
        waiting = self.waiting()
        sent = []
        for step in candidates:
            if not liveness.overdue(step, now, self.settings, waiting) or not self._claim_redispatch(step, now):
                continue
            assert step.task is not None
            expired = step.leased and liveness.lease_expiry(step, self.settings) <= now
            log_event(
                log,
                "study.redispatched",
                logging.WARNING,
                study_uid=step.study_uid,
                state=step.state,
                task=step.task,
                reason=f"lease of {step.lease_owner} expired" if expired else "no message waiting for this step",
            )
            if self._send(step.study_uid, step.task):
                sent.append((step.task, step.study_uid))
        return sent

    def _claim_redispatch(self, step: liveness.Step, now: datetime) -> bool:
        """Compare-and-set `dispatched_at` on the row as it was read, so one gateway of several re-sends."""
        unchanged = [
            Study.study_uid == step.study_uid,
            Study.state == step.state,
            Study.dispatched_at.is_(None) if step.dispatched_at is None else Study.dispatched_at == step.dispatched_at,
            Study.lease_until.is_(None) if step.lease_until is None else Study.lease_until == step.lease_until,
        ]
        values: dict[str, Any] = {"dispatched_at": now}
        if step.state == State.QUEUED:
            values["queued_at"] = now  # as before: a re-sent study counts its queue wait from now
        with self.sessions() as session:
            claimed = session.execute(
                update(Study).where(*unchanged).values(**values).execution_options(synchronize_session=False)
            )
            session.commit()
        return claimed.rowcount == 1  # type: ignore[attr-defined]

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

    # Start-up recovery ---------------------------------------------------------------------------

    def recover(self, now: datetime | None = None) -> dict[str, list[str]]:
        """Embedded mode: re-dispatch the work an in-process queue lost with the previous process."""
        if not self.embedded:
            return {}
        now = now or utcnow()
        with self.sessions() as session:
            # Without a broker only this process scores and delivers, so a lease still running belongs to the
            # previous process, which is gone (stopped mid-step, or crashed): end it now rather than letting
            # the study wait out its lease. The next pass then re-dispatches it.
            orphaned = session.execute(
                update(Study)
                .where(
                    Study.state.in_((State.SCORING, State.REPORTED)),
                    Study.lease_until.is_not(None),
                    Study.lease_until > now,
                )
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
