"""Study completion and hand-over: the quiet timer, the monitor's passes and recovery, the task queue,
and a real `btd serve` restarted during the quiet period."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers_gateway import GatewayProcess, wait_until
from sqlalchemy import select

from core import queue
from core.contracts import State, Task
from core.db import migrate, repository
from core.db.schema import Study, StudyEvent
from core.db.session import dispose_engines, session_scope
from core.dicom import sender
from core.settings import Settings
from service.stability import StabilityMonitor
from worker.registry import in_process_tasks

SCORE_STUDY, BUILD_REPORT, DELIVER_REPORT = Task.SCORE_STUDY, Task.BUILD_REPORT, Task.DELIVER_REPORT

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SR_DOCUMENT = "1.2.840.10008.5.1.4.1.1.88.22"
REDIS_URL = "redis://127.0.0.1:6379/0"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    s = Settings(data_dir=tmp_path_factory.mktemp("stability"), stable_seconds=10)
    migrate.upgrade(s)
    yield s
    dispose_engines()


class Recorder:
    """A dispatcher that remembers what it was asked to send (the monitor's only output)."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, str]] = []
        self.fail = fail

    def __call__(self, name: str, *args: Any) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.sent.append((name, *args))


def new_study(settings: Settings, now: datetime, sop_class: str = CT_IMAGE) -> str:
    study_uid = f"2.25.{uuid.uuid4().int}"
    add_instance(settings, study_uid, now, sop_class)
    return study_uid


def add_instance(settings: Settings, study_uid: str, now: datetime, sop_class: str = CT_IMAGE) -> None:
    received = repository.ReceivedInstance(
        study_uid=study_uid,
        series_uid=study_uid + ".1",
        sop_instance_uid=f"2.25.{uuid.uuid4().int}",
        sop_class_uid=sop_class,
        transfer_syntax="1.2.840.10008.1.2.1",
        size=10,
        sha256=uuid.uuid4().hex * 2,
        modality="CT" if sop_class == CT_IMAGE else "SR",
    )
    with session_scope(settings) as session:
        repository.record_instance(
            session, received, stable_seconds=settings.stable_seconds, store=lambda v: f"x.v{v}.dcm", now=now
        )


def state_of(settings: Settings, study_uid: str) -> Study:
    with session_scope(settings) as session:
        study = repository.get_study(session, study_uid)
        assert study is not None
        return study


def set_state(settings: Settings, study_uid: str, state: str, **values: Any) -> None:
    with session_scope(settings) as session:
        current = repository.get_study(session, study_uid)
        assert current is not None
        assert repository.transition(session, study_uid, current.state, state, "test", **values)


def test_each_instance_restarts_the_quiet_timer(settings: Settings) -> None:
    t0 = datetime.now(UTC) + timedelta(days=1)  # in the future: no other test's pass can touch it
    study_uid = new_study(settings, t0)
    add_instance(settings, study_uid, t0 + timedelta(seconds=7))
    sent = Recorder()
    monitor = StabilityMonitor(settings, dispatch=sent, embedded=False)
    monitor.run_once(now=t0 + timedelta(seconds=12))  # 12 s after the first, 5 s after the last
    assert state_of(settings, study_uid).state == State.RECEIVING and (SCORE_STUDY, study_uid) not in sent.sent
    monitor.run_once(now=t0 + timedelta(seconds=17.5))
    study = state_of(settings, study_uid)
    assert study.state == State.QUEUED and study.queued_at == t0 + timedelta(seconds=17.5)
    assert (SCORE_STUDY, study_uid) in sent.sent
    with session_scope(settings) as session:
        steps = session.execute(
            select(StudyEvent.from_state, StudyEvent.to_state).where(StudyEvent.study_uid == study_uid)
        ).all()
    assert [tuple(s) for s in steps] == [
        (None, State.RECEIVING),
        (State.RECEIVING, State.STABLE),
        (State.STABLE, State.QUEUED),
    ]


def test_a_study_without_ct_or_mr_images_is_rejected(settings: Settings) -> None:
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    study_uid = new_study(settings, t0, sop_class=SR_DOCUMENT)
    sent = Recorder()
    StabilityMonitor(settings, dispatch=sent, embedded=False).run_once()
    study = state_of(settings, study_uid)
    assert study.state == State.REJECTED and "no CT or MR image" in (study.error or "")
    assert all(uid != study_uid for _, uid in sent.sent)


def test_a_failed_dispatch_is_retried_on_the_next_pass(settings: Settings) -> None:
    study_uid = new_study(settings, datetime.now(UTC) - timedelta(minutes=5))
    StabilityMonitor(settings, dispatch=Recorder(fail=True), embedded=False).run_once()
    assert state_of(settings, study_uid).state == State.STABLE
    sent = Recorder()
    StabilityMonitor(settings, dispatch=sent, embedded=False).run_once()
    assert state_of(settings, study_uid).state == State.QUEUED and (SCORE_STUDY, study_uid) in sent.sent


def test_embedded_start_re_dispatches_what_the_lost_queue_held(settings: Settings) -> None:
    past = datetime.now(UTC) - timedelta(minutes=5)
    queued, scoring, scored, reported, delivered = (new_study(settings, past) for _ in range(5))
    set_state(settings, queued, State.QUEUED)
    set_state(settings, scoring, State.SCORING)  # no lease: its worker thread died with the process
    set_state(settings, scored, State.SCORED)
    set_state(settings, reported, State.REPORTED)
    set_state(settings, delivered, State.DELIVERED)
    sent = Recorder()
    StabilityMonitor(settings, dispatch=sent, embedded=True).recover()
    assert {(SCORE_STUDY, queued), (SCORE_STUDY, scoring), (BUILD_REPORT, scored), (DELIVER_REPORT, reported)} <= set(
        sent.sent
    )
    assert all(uid != delivered for _, uid in sent.sent)
    with_broker = Recorder()
    StabilityMonitor(settings, dispatch=with_broker, embedded=False).recover()
    assert with_broker.sent == []  # Redis still holds those messages


def test_an_expired_lease_is_re_dispatched_once(settings: Settings) -> None:
    study_uid = new_study(settings, datetime.now(UTC) - timedelta(minutes=5))
    set_state(
        settings, study_uid, State.SCORING, lease_owner="dead", lease_until=datetime.now(UTC) - timedelta(seconds=1)
    )
    sent = Recorder()
    monitor = StabilityMonitor(settings, dispatch=sent, embedded=True)
    monitor.run_once()
    monitor.run_once()
    assert sent.sent.count((SCORE_STUDY, study_uid)) == 1


def test_embedded_start_ends_the_lease_of_the_process_that_is_gone(settings: Settings) -> None:
    """`btd serve` stopped (or crashed) mid-scoring left a live lease; only this process scores in embedded
    mode, so the study is picked up at once instead of waiting out the lease."""
    study_uid = new_study(settings, datetime.now(UTC) - timedelta(minutes=5))
    set_state(
        settings, study_uid, State.SCORING, lease_owner="gone", lease_until=datetime.now(UTC) + timedelta(hours=1)
    )
    with_broker = Recorder()
    broker_monitor = StabilityMonitor(settings, dispatch=with_broker, embedded=False)
    broker_monitor.recover()
    broker_monitor.run_once()
    assert with_broker.sent == []  # another worker may really hold it: its lease is respected
    sent = Recorder()
    monitor = StabilityMonitor(settings, dispatch=sent, embedded=True)
    monitor.recover()
    monitor.run_once()
    assert sent.sent.count((SCORE_STUDY, study_uid)) == 1


def test_with_a_broker_a_long_queued_study_is_re_dispatched(settings: Settings) -> None:
    study_uid = new_study(settings, datetime.now(UTC) - timedelta(minutes=5))
    old = datetime.now(UTC) - timedelta(seconds=settings.visibility_timeout + 60)
    set_state(settings, study_uid, State.QUEUED, queued_at=old)
    sent = Recorder()
    monitor = StabilityMonitor(settings, dispatch=sent, embedded=False)
    monitor.run_once()
    monitor.run_once()
    assert sent.sent.count((SCORE_STUDY, study_uid)) == 1
    assert state_of(settings, study_uid).queued_at > old


def test_in_process_executor_logs_an_unknown_task_and_keeps_running(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []
    done = threading.Event()

    def known(value: str) -> None:
        ran.append(value)
        done.set()

    registry = {"test.known": known}
    executor = queue.InProcessExecutor(resolver=registry.get).start()
    with caplog.at_level(logging.ERROR, logger="btd.queue"):
        executor.submit("btd.no_such_task", ("x",))
        executor.submit("test.known", ("y",))
        assert done.wait(10)
        assert executor.join_idle(10)
    executor.stop()
    assert ran == ["y"] and executor.failures == 1 and executor.completed == 1
    assert any(getattr(r, "event", "") == "task.unknown" for r in caplog.records)


def test_in_process_dispatch_of_a_name_worker_tasks_lacks_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture, settings: Settings
) -> None:
    queue.start_executor(in_process_tasks(settings).get)  # what `btd serve` starts without a broker
    with caplog.at_level(logging.ERROR, logger="btd.queue"):
        queue.dispatch("btd.no_such_task", "2.25.1", settings=settings)  # no broker in these settings
        executor = queue.current_executor()
        assert executor is not None and executor.join_idle(120)
    queue.stop_executor()
    assert any(getattr(r, "event", "") in {"task.unknown", "task.unresolvable"} for r in caplog.records)


@pytest.mark.redis
def test_dispatch_with_a_broker_sends_a_celery_message_by_name(tmp_path: Path) -> None:
    name = f"btd-test-{uuid.uuid4().hex[:8]}"
    s = Settings(data_dir=tmp_path, broker_url=REDIS_URL, queue_name=name)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        queue.dispatch(SCORE_STUDY, "2.25.42", settings=s)
        assert queue.queue_depth(s) == 1
        message = json.loads(client.lpop(name))  # type: ignore[arg-type]
        assert message["headers"]["task"] == SCORE_STUDY
        assert "2.25.42" in json.dumps(message)
    finally:
        client.delete(name)


@pytest.mark.redis
@pytest.mark.slow
def test_gateway_restarted_during_the_quiet_period_still_completes_the_study(tmp_path: Path) -> None:
    """Receive, stop `btd serve` before the timer runs out, start it again: the study is queued."""
    queue_name = f"btd-test-{uuid.uuid4().hex[:8]}"
    gateway = GatewayProcess(
        tmp_path / "gw",
        stable_seconds=6,
        monitor_interval=0.5,
        min_free_bytes=0,
        broker_url=REDIS_URL,  # a queue nobody consumes: the test sees the message, no model runs
        queue_name=queue_name,
    )
    client = redis.Redis.from_url(REDIS_URL)
    settings = Settings(data_dir=tmp_path / "gw")
    try:
        gateway.start(timeout=120)
        results = sender.send_files(
            [FIXTURES / "ct_series_20"], "127.0.0.1", gateway.dicom_port, "BTD", "RESTART", timeout=60
        )
        assert len(results) == 20 and all(r.status == 0 for r in results)
        assert gateway.stop() == 0  # SIGTERM: a clean exit
        with session_scope(settings) as session:
            study = session.scalars(select(Study)).one()
            assert study.state == State.RECEIVING and study.n_instances == 20
            last = max(i.received_at for i in repository.study_instances(session, study.study_uid))
            assert study.quiet_deadline == last + timedelta(seconds=6)  # restarted by the last instance
            study_uid = study.study_uid
        dispose_engines()
        gateway.start(timeout=120)
        wait_until(lambda: client.llen(queue_name) == 1, timeout=60, what="score_study message in Redis")
        assert state_of(settings, study_uid).state == State.QUEUED
    finally:
        gateway.stop()
        client.delete(queue_name)
        dispose_engines()
    assert "gateway.stopped" in gateway.log_text()
