"""`/readyz` tells the truth: not ready (503, the reason named) when the spool is under its watermark, when
no worker of a queue has been seen (Celery mode: heartbeats in a real Redis), or when studies are stuck
past their deadline; the same stuck studies are a metric and a dashboard alarm, and the workers' own
metrics reach the gateway's `/metrics` with a `worker` label."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from core.contracts import QueueRole, State
from core.db import migrate, repository
from core.db.schema import Study
from core.db.session import dispose_engines, session_scope
from core.observability import fleet
from core.observability.metrics import TASK_OUTCOMES
from core.settings import Settings
from service.api.app import create_app

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    s = Settings(data_dir=tmp_path / "data", min_free_bytes=0)
    migrate.upgrade(s)
    yield s
    dispose_engines()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def lost_study(settings: Settings, state: State, age: timedelta) -> str:
    """A study left in `state` for `age` with no message anywhere (what the issue saw: SCORED for good)."""
    study_uid = f"2.25.{uuid.uuid4().int}"
    received = repository.ReceivedInstance(
        study_uid=study_uid, series_uid=study_uid + ".1", sop_instance_uid=f"2.25.{uuid.uuid4().int}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1", size=4,
        sha256="0" * 64, modality="CT",
    )
    with session_scope(settings) as session:
        repository.record_instance(session, received, stable_seconds=30, store=lambda v: f"x.v{v}.dcm")
        assert repository.transition(session, study_uid, State.RECEIVING, state, "test")
        session.execute(
            update(Study).where(Study.study_uid == study_uid).values(state_since=datetime.now(UTC) - age)
        )
    return study_uid


def test_spool_under_its_watermark_is_not_ready_and_says_why(settings: Settings) -> None:
    """Every C-STORE is answered 0xA700 below BTD_MIN_FREE_BYTES; /readyz said ready regardless."""
    assert TestClient(create_app(settings)).get("/readyz").status_code == 200
    full = settings.model_copy(update={"min_free_bytes": 2**62})
    resp = TestClient(create_app(full)).get("/readyz")
    assert resp.status_code == 503 and resp.json()["failed"] == ["spool"]
    assert "under BTD_MIN_FREE_BYTES" in resp.json()["checks"]["spool"]["detail"]


def test_a_stuck_study_fails_readiness_and_shows_as_metric_and_alarm(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    young = lost_study(settings, State.SCORED, timedelta(seconds=30))  # the sweep still has time for it
    assert client.get("/readyz").status_code == 200
    assert "Stuck studies" not in client.get("/").text
    lost_study(settings, State.SCORED, timedelta(seconds=settings.stuck_seconds + 60))
    resp = client.get("/readyz")
    assert resp.status_code == 503 and resp.json()["failed"] == ["studies"]
    assert resp.json()["checks"]["studies"]["detail"] == "1 stuck (SCORED 1)"
    found = samples(client.get("/metrics").text)
    assert found[("btd_studies_stuck", (("state", "SCORED"),))] == 1
    assert found[("btd_studies_stuck", (("state", "QUEUED"),))] == 0  # every deadline state, zero when none
    page = client.get("/").text
    assert 'id="stuck-alarm"' in page and 'data-stuck-state="SCORED">1<' in page
    assert young not in resp.text  # readiness names states and counts, never a study


@pytest.mark.redis
def test_celery_mode_needs_a_live_worker_for_each_queue_and_shows_its_metrics(settings: Settings) -> None:
    queue_name = f"btd-ready-{uuid.uuid4().hex[:8]}"
    celery = settings.model_copy(update={"broker_url": REDIS_URL, "queue_name": queue_name, "worker_absent_seconds": 5})
    client = TestClient(create_app(celery))
    r = redis.Redis.from_url(REDIS_URL)
    try:
        resp = client.get("/readyz")
        assert resp.status_code == 503 and resp.json()["failed"] == ["workers"]
        assert "scoring, reports" in resp.json()["checks"]["workers"]["detail"]

        TASK_OUTCOMES.labels(task="btd.score_study", outcome="scored").inc()  # as a worker's task counts
        publisher = fleet.HeartbeatPublisher(celery, "host-a:11", [QueueRole.REPORTS.value])
        publisher.beat()
        resp = client.get("/readyz")
        assert resp.status_code == 503 and "scoring" in resp.json()["checks"]["workers"]["detail"]
        fleet.HeartbeatPublisher(celery, "host-b:12", [QueueRole.SCORING.value]).beat()
        resp = client.get("/readyz")
        assert resp.status_code == 200, resp.text
        assert resp.json()["checks"]["workers"]["detail"] == "2 worker(s): host-a:11, host-b:12"

        found = samples(client.get("/metrics").text)
        labels = (("outcome", "scored"), ("task", "btd.score_study"), ("worker", "host-b:12"))
        assert found[("btd_task_outcomes_total", labels)] >= 1  # the worker's own count, under its name
        assert ("btd_task_outcomes_total", (("outcome", "scored"), ("task", "btd.score_study"))) in found  # ours

        time.sleep(6)  # both heartbeats expire (BTD_WORKER_ABSENT_SECONDS = 5 here): the workers are gone
        assert client.get("/readyz").json()["failed"] == ["workers"]
        assert not any(("worker", "host-b:12") in key[1] for key in samples(client.get("/metrics").text))
    finally:
        r.delete(*r.keys(f"{queue_name}.worker.*") or [f"{queue_name}.none"])
        r.close()
