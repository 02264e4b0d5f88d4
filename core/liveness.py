"""When a study step is overdue (the monitor dispatches it again) and when it is stuck (an alarm).

Every state that waits on a message has a deadline, read from the studies row alone, so any gateway
sharing the database decides the same (docs/architecture.md, "Deadlines"):

- QUEUED, SCORED, REPORTED without a lease: the step's task must be taken within BTD_REDISPATCH_SECONDS
  of the step's start (entering the state, the monitor's last re-dispatch, or a retry's due time). A
  message still waiting in the queue (a backlog) is never overdue: it is there, and a duplicate would only
  wait behind it.
- SCORING, and REPORTED while a worker delivers: the worker holds a lease of BTD_LEASE_SECONDS renewed by
  its heartbeat; once it runs out the worker is presumed dead and the step is overdue at once (and again
  every BTD_REDISPATCH_SECONDS while nobody takes it over).
- STABLE: the monitor queues it every pass; it has no message to lose.

A step is *stuck* when nothing legitimately holds it (no message waiting, no live lease, no retry timer
running) for BTD_STUCK_SECONDS from its start; the monitor has then re-dispatched it many times in vain,
so a person must look. Why measured from the state's start and not the last re-dispatch: re-dispatching
must not reset the alarm.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import STEP_TASKS, State
from core.db.schema import Study
from core.settings import Settings

# The states with a deadline: those waiting on a task, and STABLE (waiting on the monitor itself).
DEADLINE_STATES: tuple[State, ...] = (State.STABLE, *STEP_TASKS)

# The states whose task the monitor's sweep may dispatch again.
STEP_TASKS_STATES: tuple[State, ...] = tuple(STEP_TASKS)

Waiting = set[tuple[str, str]] | None  # core.queue.waiting_messages: (task, study) waiting; None = unknown


@dataclass(frozen=True)
class Step:
    """The columns of a studies row that decide its deadline."""

    study_uid: str
    state: str
    state_since: datetime
    queued_at: datetime | None
    dispatched_at: datetime | None
    retry_at: datetime | None
    lease_until: datetime | None
    lease_owner: str | None

    @property
    def task(self) -> str | None:
        task = STEP_TASKS.get(State(self.state))
        return task.value if task is not None else None

    @property
    def leased(self) -> bool:
        """A worker claimed this step (scoring always; delivery while a worker sends)."""
        return self.state == State.SCORING or (self.state == State.REPORTED and self.lease_owner is not None)


def load_steps(session: Session, states: Iterable[str] = DEADLINE_STATES) -> list[Step]:
    """Every study in a state with a deadline (few: the others are finished or receiving)."""
    rows = session.execute(
        select(
            Study.study_uid,
            Study.state,
            Study.state_since,
            Study.queued_at,
            Study.dispatched_at,
            Study.retry_at,
            Study.lease_until,
            Study.lease_owner,
        ).where(Study.state.in_(list(states)))
    )
    return [Step(*row) for row in rows]


def lease_expiry(step: Step, settings: Settings) -> datetime:
    """When the step's lease runs out; a claimed step without a lease (a crash between writes, an old row)
    is given one lease from when it entered the state."""
    return step.lease_until or step.state_since + timedelta(seconds=settings.lease_seconds)


def _latest(*times: datetime | None) -> datetime:
    return max(t for t in times if t is not None)


def step_start(step: Step) -> datetime:
    """When the step's current wait began: entering the state (QUEUED: when queued), or its retry's due
    time if later."""
    entered = step.queued_at if step.state == State.QUEUED and step.queued_at else step.state_since
    return _latest(entered, step.retry_at)


def message_waiting(step: Step, waiting: Waiting) -> bool:
    return waiting is not None and step.task is not None and (step.task, step.study_uid) in waiting


def overdue(step: Step, now: datetime, settings: Settings, waiting: Waiting) -> bool:
    """Should the monitor dispatch this step's task again now?"""
    redispatch = timedelta(seconds=settings.redispatch_seconds)
    if step.state == State.STABLE or step.task is None:
        return False  # queued by every pass; not a message
    if step.leased:
        expiry = lease_expiry(step, settings)
        if expiry > now:
            return False  # a live worker holds it
        last = step.dispatched_at
        return last is None or last < expiry or now - last > redispatch
    if message_waiting(step, waiting):
        return False
    return now - _latest(step_start(step), step.dispatched_at) > redispatch


def stuck(step: Step, now: datetime, settings: Settings, waiting: Waiting) -> bool:
    """Has this step waited past its deadline with nothing holding it for BTD_STUCK_SECONDS?"""
    limit = timedelta(seconds=settings.stuck_seconds)
    if step.state == State.STABLE:
        return now - step.state_since > limit
    if step.leased:
        return now - lease_expiry(step, settings) > limit
    if message_waiting(step, waiting):
        return False
    return now - _latest(step.state_since, step.retry_at) > limit


def stuck_counts(steps: Iterable[Step], now: datetime, settings: Settings, waiting: Waiting) -> dict[str, int]:
    """{state: number of stuck studies} for every state with a deadline (zeros included)."""
    counts = {state.value: 0 for state in DEADLINE_STATES}
    for step in steps:
        if stuck(step, now, settings, waiting):
            counts[step.state] = counts.get(step.state, 0) + 1
    return counts
