"""No study is ever stuck: the deadlines of core/liveness.py, the monitor's sweep that re-dispatches an
overdue step in both modes (once, even with two gateways), the leases of scoring and delivery, and the
two queues a Celery message is routed to (read back from a real Redis)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select, update
from test_delivery import CountingSCP, reported_study

from core import liveness, queue
from core.contracts import QueueRole, State, Task
from core.db import migrate, repository
from core.db.schema import DeliveryAttempt, Study
from core.db.session import dispose_engines, session_scope
from core.settings import Settings
from service.stability import StabilityMonitor
from worker import celery_app, report_tasks

REDIS_URL = "redis://127.0.0.1:6379/0"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    s = Settings(data_dir=tmp_path / "data")
    migrate.upgrade(s)
    yield s
    dispose_engines()


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, ...]] = []

    def __call__(self, name: str, *args: Any) -> None:
        self.sent.append((str(name), *args))


def study_in(settings: Settings, state: State, since: datetime, **values: Any) -> str:
    """A study put straight into `state`, entered at `since` (what a lost message leaves behind)."""
    study_uid = f"2.25.{uuid.uuid4().int}"
    received = repository.ReceivedInstance(
        study_uid=study_uid,
        series_uid=study_uid + ".1",
        sop_instance_uid=f"2.25.{uuid.uuid4().int}",
        sop_class_uid=CT_IMAGE,
        transfer_syntax="1.2.840.10008.1.2.1",
        size=10,
        sha256=uuid.uuid4().hex * 2,
        modality="CT",
    )
    with session_scope(settings) as session:
        repository.record_instance(session, received, stable_seconds=30, store=lambda v: f"x.v{v}.dcm")
        assert repository.transition(session, study_uid, State.RECEIVING, state, "test", **values)
        session.execute(update(Study).where(Study.study_uid == study_uid).values(state_since=since))
    return study_uid


def row(settings: Settings, study_uid: str) -> Study:
    with session_scope(settings) as session:
        study = repository.get_study(session, study_uid)
        assert study is not None
        return study


def monitor(settings: Settings, sent: Recorder, waiting: set[tuple[str, str]] | None = None) -> StabilityMonitor:
    """A monitor in Celery mode (embedded=False) whose queue holds `waiting`."""
    return StabilityMonitor(settings, dispatch=sent, embedded=False, waiting=lambda: set(waiting or ()))


def test_with_a_broker_a_scored_study_whose_report_message_was_lost_is_re_dispatched_once(settings: Settings) -> None:
    """The issue's case: the worker's dispatch of build_report failed (Redis down); the study stayed SCORED
    for good because only embedded mode re-sent SCORED and REPORTED studies."""
    now = datetime.now(UTC)
    scored = study_in(settings, State.SCORED, now - timedelta(seconds=settings.redispatch_seconds + 5))
    reported = study_in(settings, State.REPORTED, now - timedelta(seconds=settings.redispatch_seconds + 5))
    fresh = study_in(settings, State.SCORED, now - timedelta(seconds=5))
    sent = Recorder()
    gateway = monitor(settings, sent)
    gateway.run_once(now)
    gateway.run_once(now + timedelta(seconds=1))  # the next pass: not again before another deadline
    assert sorted(sent.sent) == sorted([(Task.BUILD_REPORT, scored), (Task.DELIVER_REPORT, reported)])
    assert row(settings, scored).dispatched_at == now
    gateway.run_once(now + timedelta(seconds=settings.redispatch_seconds + 1))  # lost again: sent again
    assert sent.sent.count((Task.BUILD_REPORT, scored)) == 2
    assert all(uid != fresh for _, uid in sent.sent[:2])


def test_a_message_still_waiting_in_the_queue_is_never_duplicated(settings: Settings) -> None:
    """A backlog is not a lost message: the sweep piled one duplicate per visibility timeout before."""
    long_ago = datetime.now(UTC) - timedelta(hours=3)
    study_uid = study_in(settings, State.QUEUED, long_ago, queued_at=long_ago)
    sent = Recorder()
    backlog = monitor(settings, sent, waiting={(Task.SCORE_STUDY.value, study_uid)})
    for _ in range(3):
        backlog.run_once()
    assert sent.sent == []
    step = next(s for s in steps_for(settings, study_uid))
    assert not liveness.stuck(step, datetime.now(UTC), settings, {(Task.SCORE_STUDY.value, study_uid)})
    monitor(settings, sent).run_once()  # the queue lost it (a Redis restart): sent once
    assert sent.sent == [(Task.SCORE_STUDY, study_uid)]


def test_with_a_broker_an_expired_scoring_lease_is_taken_over_within_the_lease(settings: Settings) -> None:
    """A worker killed with its whole process group: Redis would re-deliver its message only after the
    visibility timeout (two hours by default); the lease runs out within a minute and the monitor re-sends."""
    now = datetime.now(UTC)
    dead = study_in(settings, State.SCORING, now - timedelta(minutes=5), lease_owner="dead:1", lease_until=now)
    live = study_in(settings, State.SCORING, now - timedelta(minutes=5), lease_owner="live:2",
                    lease_until=now + timedelta(seconds=30))
    sent = Recorder()
    gateway = monitor(settings, sent)
    gateway.run_once(now - timedelta(seconds=1))  # still within the lease: nothing
    assert sent.sent == []
    gateway.run_once(now + timedelta(seconds=1))
    gateway.run_once(now + timedelta(seconds=2))
    assert sent.sent == [(Task.SCORE_STUDY, dead)]
    assert all(uid != live for _, uid in sent.sent)


def test_a_retry_waiting_on_its_countdown_is_not_mistaken_for_a_lost_message(settings: Settings) -> None:
    now = datetime.now(UTC)
    study_uid = study_in(settings, State.REPORTED, now - timedelta(minutes=10), retry_at=now + timedelta(seconds=240))
    sent = Recorder()
    gateway = monitor(settings, sent)
    gateway.run_once(now + timedelta(seconds=200))
    assert sent.sent == []
    gateway.run_once(now + timedelta(seconds=240 + settings.redispatch_seconds + 1))  # the retry never came
    assert sent.sent == [(Task.DELIVER_REPORT, study_uid)]


def test_two_gateways_sharing_the_database_re_dispatch_once(settings: Settings) -> None:
    now = datetime.now(UTC)
    study_uid = study_in(settings, State.SCORED, now - timedelta(minutes=5))
    sent = Recorder()
    first, second = monitor(settings, sent), monitor(settings, sent)
    steps = steps_for(settings, study_uid)
    assert first._claim_redispatch(steps[0], now) is True
    assert second._claim_redispatch(steps[0], now) is False  # the same row as read: already claimed
    second.run_once(now)
    assert sent.sent == []


def test_stuck_counts_only_what_nothing_holds_past_its_deadline(settings: Settings) -> None:
    now = datetime.now(UTC)
    limit = timedelta(seconds=settings.stuck_seconds + 1)
    lost = study_in(settings, State.SCORED, now - limit)
    waiting = study_in(settings, State.QUEUED, now - limit, queued_at=now - limit)
    long_job = study_in(settings, State.SCORING, now - limit, lease_owner="w", lease_until=now + timedelta(seconds=40))
    dead = study_in(settings, State.SCORING, now - 2 * limit, lease_owner="w", lease_until=now - limit)
    young = study_in(settings, State.REPORTED, now - timedelta(seconds=30))
    steps = [s for uid in (lost, waiting, long_job, dead, young) for s in steps_for(settings, uid)]
    stuck = {s.study_uid for s in steps if liveness.stuck(s, now, settings, {(Task.SCORE_STUDY.value, waiting)})}
    assert stuck == {lost, dead}
    assert liveness.stuck_counts(steps, now, settings, None)[State.QUEUED] == 1  # queue unknown: by deadline


def steps_for(settings: Settings, study_uid: str) -> list[liveness.Step]:
    with session_scope(settings) as session:
        return [s for s in liveness.load_steps(session) if s.study_uid == study_uid]


def test_a_duplicate_delivery_finds_the_study_leased_and_sends_nothing(tmp_path: Path) -> None:
    """Two deliveries at once could each send before either recorded success: the second must not send."""
    with CountingSCP("PACS") as pacs:
        settings = Settings(data_dir=tmp_path / "data", destinations=[pacs.destination])
        migrate.upgrade(settings)
        study_uid = reported_study(settings)
        until = datetime.now(UTC) + timedelta(seconds=50)
        with session_scope(settings) as session:
            session.execute(
                update(Study).where(Study.study_uid == study_uid).values(lease_owner="other:1", lease_until=until)
            )
        outcome = report_tasks.run_deliver_report(study_uid, settings, timeout=5)
        assert outcome.kind == report_tasks.SKIPPED and "other:1" in (outcome.detail or "")
        assert pacs.received == []
        with session_scope(settings) as session:  # the other worker died: its lease ran out
            session.execute(update(Study).where(Study.study_uid == study_uid).values(lease_until=datetime.now(UTC)))
        assert report_tasks.run_deliver_report(study_uid, settings, timeout=5).kind == report_tasks.DELIVERED
        assert len(pacs.received) == 2  # SR + KOS, once
    study = row(settings, study_uid)
    assert study.state == State.DELIVERED and study.lease_owner is None and study.lease_until is None
    with session_scope(settings) as session:
        assert len(session.scalars(select(DeliveryAttempt)).all()) == 1
    dispose_engines()


def test_a_failed_delivery_round_records_when_its_retry_is_due_and_releases_the_lease(tmp_path: Path) -> None:
    from helpers_gateway import free_port

    settings = Settings(data_dir=tmp_path / "data", destinations=[f"DOWN@127.0.0.1:{free_port()}"])
    migrate.upgrade(settings)
    study_uid = reported_study(settings)
    before = datetime.now(UTC)
    outcome = report_tasks.run_deliver_report(study_uid, settings, final_attempt=False, timeout=2, retry_in=120)
    assert outcome.kind == report_tasks.RETRY
    study = row(settings, study_uid)
    assert study.state == State.REPORTED and study.lease_owner is None and study.lease_until is None
    assert study.retry_at is not None and study.retry_at >= before + timedelta(seconds=120)
    dispose_engines()


def test_tasks_are_routed_to_their_role_s_queue(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_url=REDIS_URL, queue_name="q-route")
    assert queue.queue_for(Task.SCORE_STUDY, settings) == "q-route"
    assert queue.queue_for(Task.BUILD_REPORT, settings) == "q-route.reports"
    assert queue.queue_for(Task.DELIVER_REPORT, settings) == "q-route.reports"
    assert queue.broker_queues(settings) == ["q-route", "q-route.reports"]
    assert queue.broker_queues(settings, [QueueRole.REPORTS]) == ["q-route.reports"]
    routes = celery_app.celery_config(settings)["task_routes"]
    assert routes[Task.BUILD_REPORT.value] == {"queue": "q-route.reports"}  # a Celery retry goes there too
    assert routes[Task.SCORE_STUDY.value] == {"queue": "q-route"}


@pytest.mark.redis
def test_messages_waiting_in_redis_are_read_back_per_study_step(tmp_path: Path) -> None:
    name = f"btd-test-{uuid.uuid4().hex[:8]}"
    settings = Settings(data_dir=tmp_path, broker_url=REDIS_URL, queue_name=name)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        queue.dispatch(Task.SCORE_STUDY, "2.25.1", settings=settings)
        queue.dispatch(Task.BUILD_REPORT, "2.25.2", settings=settings)
        assert client.llen(name) == 1 and client.llen(f"{name}.reports") == 1
        expected = {(Task.SCORE_STUDY.value, "2.25.1"), (Task.BUILD_REPORT.value, "2.25.2")}
        assert queue.waiting_messages(settings) == expected
        assert queue.queue_depth(settings) == 2
    finally:
        client.delete(name, f"{name}.reports")
        client.close()
    unreachable = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    assert queue.waiting_messages(unreachable) is None  # unknown, not "nothing waiting"


def test_the_in_process_executor_reports_what_it_holds() -> None:
    import threading

    release = threading.Event()
    executor = queue.InProcessExecutor({"t.block": lambda _uid: release.wait(10)}.get).start()
    try:
        executor.submit("t.block", ("2.25.7",))
        executor.submit_later(60, "t.block", ("2.25.8",))
        assert executor.waiting() == {("t.block", "2.25.7"), ("t.block", "2.25.8")}
        release.set()
        assert executor.join_idle(10)
        assert executor.waiting() == {("t.block", "2.25.8")}  # still on its timer
    finally:
        executor.stop()
