"""`/metrics`: the flow's counters and histograms, and studies by state read from a real database."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from core.db.migrate import upgrade
from core.db.schema import Study
from core.db.session import session_scope
from core.observability import metrics
from core.settings import Settings
from service.api.app import create_app


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    settings = Settings(data_dir=tmp_path_factory.mktemp("metrics"))
    upgrade(settings)
    now = datetime.now(UTC)
    with session_scope(settings) as session:
        for i, state in enumerate(["DELIVERED", "DELIVERED", "FAILED", "SCORING", "RECEIVING"]):
            session.add(Study(study_uid=f"1.2.3.{i}", state=state, state_since=now, created_at=now, updated_at=now))
    return TestClient(create_app(settings))


def test_metrics_exposes_studies_by_state_from_the_database(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples[("btd_studies", (("state", "DELIVERED"),))] == 2
    assert samples[("btd_studies", (("state", "FAILED"),))] == 1
    assert samples[("btd_studies", (("state", "SCORING"),))] == 1
    # Every state of the contract is exported, zero when empty, so alerts never see a missing series.
    for state in metrics.STUDY_STATES:
        assert ("btd_studies", (("state", state),)) in samples
    assert samples[("btd_studies", (("state", "REJECTED"),))] == 0


def test_metrics_lists_every_flow_metric(client: TestClient) -> None:
    metrics.INSTANCES_RECEIVED.labels(status="0x0000").inc()
    metrics.DELIVERY_ATTEMPTS.labels(outcome="failure").inc()
    metrics.SCORING_SECONDS_PER_SLICE.observe(0.3)
    text = client.get("/metrics").text
    for name in (
        "btd_instances_received_total",
        "btd_bytes_received_total",
        "btd_associations_total",
        "btd_scoring_seconds_per_slice",
        "btd_queue_wait_seconds",
        "btd_delivery_attempts_total",
        "btd_model_load_seconds",
        "btd_studies_scored_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    samples = _samples(text)
    assert samples[("btd_instances_received_total", (("status", "0x0000"),))] >= 1
    assert samples[("btd_delivery_attempts_total", (("outcome", "failure"),))] >= 1
    assert samples[("btd_scoring_seconds_per_slice_bucket", (("le", "0.5"),))] >= 1


def test_state_collector_survives_a_database_failure() -> None:
    registry = CollectorRegistry()
    canary = Counter("btd_canary_total", "still exported", registry=registry)
    canary.inc()

    def broken() -> dict[str, int]:
        raise ConnectionError("database down")

    before = metrics.STATE_SCRAPE_ERRORS._value.get()
    registry.register(metrics.StudyStateCollector(broken))
    payload, _ = metrics.metrics_payload(registry)
    samples = _samples(payload.decode())
    assert samples[("btd_canary_total", ())] == 1  # the scrape still answers
    assert not any(name == "btd_studies" for name, _ in samples)  # no made-up zeros when the db is down
    assert metrics.STATE_SCRAPE_ERRORS._value.get() == before + 1


def test_installing_the_collector_twice_swaps_the_source() -> None:
    registry = CollectorRegistry()
    saved = metrics._state_collector
    metrics._state_collector = None
    try:
        metrics.install_study_state_collector(lambda: {"QUEUED": 4}, registry)
        metrics.install_study_state_collector(lambda: {"QUEUED": 9}, registry)  # no "duplicated timeseries"
        samples = _samples(metrics.metrics_payload(registry)[0].decode())
        assert samples[("btd_studies", (("state", "QUEUED"),))] == 9
    finally:
        metrics._state_collector = saved


def test_metrics_endpoint_needs_no_model(tmp_path: Path) -> None:
    # A fresh, empty database: all zeros, and nothing loads a model or touches the broker.
    settings = Settings(data_dir=tmp_path)
    upgrade(settings)
    samples = _samples(TestClient(create_app(settings)).get("/metrics").text)
    assert samples[("btd_studies", (("state", "QUEUED"),))] == 0


def test_worker_metrics_server_serves_the_same_names() -> None:
    """Celery workers have no HTTP app: `start_metrics_server` exposes their scoring and delivery metrics."""
    import httpx
    from helpers_gateway import free_port, wait_for_port

    port = free_port()
    metrics.start_metrics_server(port, addr="127.0.0.1")
    wait_for_port(port, timeout=10)
    metrics.MODEL_LOAD_SECONDS.observe(1.5)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert _samples(text)[("btd_model_load_seconds_count", ())] >= 1
