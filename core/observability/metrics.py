"""Prometheus metrics of the whole flow, defined once so every part counts into the same names.

Counters and histograms are incremented where the work happens (listener, worker, delivery). The number
of studies in each state is not counted at all: it is read from the database at scrape time by
`StudyStateCollector`, because the database is the single source of truth and a counter kept in one
process would be wrong as soon as a second process (a Celery worker) moves a study along.

In Celery mode the workers run in other processes; `start_metrics_server` lets a worker expose its own
scoring and delivery metrics on a port of its own for Prometheus to scrape beside the gateway's `/metrics`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.contracts import ALL_STATES

INSTANCES_RECEIVED = Counter(
    "btd_instances_received_total", "C-STORE requests handled, by outcome", ["status"]
)
BYTES_RECEIVED = Counter("btd_bytes_received_total", "Bytes of DICOM instances stored in the spool")
ASSOCIATIONS = Counter("btd_associations_total", "DICOM associations, by outcome", ["outcome"])
STORE_BATCH_SIZE = Histogram(
    "btd_store_batch_size",
    "Instances committed per listener transaction (concurrent associations share one: group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
SCORING_SECONDS_PER_SLICE = Histogram(
    "btd_scoring_seconds_per_slice",
    "Wall time to score one slice",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
)
QUEUE_WAIT_SECONDS = Histogram(
    "btd_queue_wait_seconds",
    "Time from a study being queued to a worker starting it",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
)
DELIVERY_ATTEMPTS = Counter("btd_delivery_attempts_total", "Report deliveries tried, by outcome", ["outcome"])
MODEL_LOAD_SECONDS = Histogram(
    "btd_model_load_seconds", "Time to load the detector model", buckets=(0.1, 0.5, 1, 2, 5, 10, 30)
)
STUDIES_SCORED = Counter("btd_studies_scored_total", "Studies scored by this process, by verdict", ["verdict"])
STATE_SCRAPE_ERRORS = Counter(
    "btd_study_state_scrape_errors_total", "Scrapes where the studies-by-state query against the database failed"
)

# The study states of the contract (docs/architecture.md); every one is exported, zero when empty, so a
# dashboard panel or an alert on e.g. FAILED never sees a missing series.
STUDY_STATES = ALL_STATES

StateCounter = Callable[[], Mapping[str, int]]


class StudyStateCollector(Collector):
    """`btd_studies{state=...}`: studies currently in each state, counted in the database per scrape."""

    def __init__(self, count_states: StateCounter) -> None:
        self.count_states = count_states

    def describe(self) -> Iterator[Metric]:
        # Declared without touching the database, so registering the collector needs no connection.
        yield GaugeMetricFamily("btd_studies", "Studies by current state", labels=["state"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("btd_studies", "Studies by current state", labels=["state"])
        try:
            counts = dict(self.count_states())
        except Exception:  # a scrape must still return the other metrics when the database is down
            STATE_SCRAPE_ERRORS.inc()
            return
        for state in sorted(set(STUDY_STATES) | set(counts)):
            family.add_metric([state], float(counts.get(state, 0)))
        yield family


_state_collector: StudyStateCollector | None = None
_state_lock = threading.Lock()


def install_study_state_collector(count_states: StateCounter, registry: CollectorRegistry = REGISTRY) -> None:
    """Register the studies-by-state collector once per process; later calls only swap the counting function.

    Why swap instead of register again: the app factory may run several times in one process (tests,
    reloads) and prometheus_client refuses a second collector with the same metric name.
    """
    global _state_collector
    with _state_lock:
        if _state_collector is None:
            _state_collector = StudyStateCollector(count_states)
            registry.register(_state_collector)
        else:
            _state_collector.count_states = count_states


def metrics_payload(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The text exposition of every registered metric and its content type, for the `/metrics` route."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve this process's metrics on their own port (for Celery workers, which have no HTTP app)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr)
