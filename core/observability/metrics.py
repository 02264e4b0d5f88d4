"""Prometheus metrics of the whole flow, defined once so every part counts into the same names.

Counters and histograms are incremented where the work happens (listener, worker, delivery). The number
of studies in each state is not counted at all: it is read from the database at scrape time by
`StudyStateCollector`, because the database is the single source of truth and a counter kept in one
process would be wrong as soon as a second process (a Celery worker) moves a study along.

`btd_studies_stuck{state=...}` (studies past their deadline with nothing holding them, core/liveness.py)
is likewise computed per scrape by `StuckStudiesCollector`.

In Celery mode the workers run in other processes: each publishes its metrics with its heartbeat
(core/observability/fleet.py) and the gateway's `/metrics` re-exposes them with a `worker` label;
`start_metrics_server` still lets a worker expose them on a port of its own.
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
TASK_OUTCOMES = Counter(
    "btd_task_outcomes_total",
    "Task runs by task and outcome (scored, failed, retry, busy, skipped, delivered, ...)",
    ["task", "outcome"],
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


class StuckStudiesCollector(Collector):
    """`btd_studies_stuck{state=...}`: studies past their deadline with nothing holding them, per scrape."""

    NAME = "btd_studies_stuck"
    HELP = "Studies stuck past their step's deadline (no message waiting, no live lease), by state"

    def __init__(self, count_stuck: StateCounter) -> None:
        self.count_stuck = count_stuck

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["state"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["state"])
        try:
            counts = dict(self.count_stuck())
        except Exception:  # the database is down: the other metrics still go out
            STATE_SCRAPE_ERRORS.inc()
            return
        for state in sorted(counts):
            family.add_metric([state], float(counts[state]))
        yield family


_stuck_collector: StuckStudiesCollector | None = None


def install_stuck_collector(count_stuck: StateCounter, registry: CollectorRegistry = REGISTRY) -> None:
    """Register the stuck-studies collector once per process (later calls swap the counting function)."""
    global _stuck_collector
    with _state_lock:
        if _stuck_collector is None:
            _stuck_collector = StuckStudiesCollector(count_stuck)
            registry.register(_stuck_collector)
        else:
            _stuck_collector.count_stuck = count_stuck


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


ForensicCounter = Callable[[], Mapping[str, int]]

# Name of each db-derived forensic gauge -> (key in the counting function's result, help text).
FORENSIC_GAUGES = {
    "btd_conflicting_instances": (
        "conflicting_instances",
        "Instances replaced by different bytes under the same SOP Instance UID (stored as new versions), from the db",
    ),
    "btd_studies_with_conflicts": ("studies_with_conflicts", "Studies holding an instance replaced under its UID"),
    "btd_duplicate_resends": ("duplicate_resends", "Identical resends of stored instances, from the db"),
}


class ForensicCollector(Collector):
    """Gauges of what arrived that is evidence in itself, read from the database per scrape (like
    `btd_studies`: every process that receives writes the same table, so no process-local counter is right)."""

    def __init__(self, count: ForensicCounter) -> None:
        self.count = count

    def describe(self) -> Iterator[Metric]:
        for name, (_key, text) in FORENSIC_GAUGES.items():
            yield GaugeMetricFamily(name, text)

    def collect(self) -> Iterator[Metric]:
        try:
            counts = dict(self.count())
        except Exception:  # the other metrics must still be scraped while the database is down
            STATE_SCRAPE_ERRORS.inc()
            return
        for name, (key, text) in FORENSIC_GAUGES.items():
            yield GaugeMetricFamily(name, text, value=float(counts.get(key, 0)))


_forensic_collector: ForensicCollector | None = None


def install_forensic_collector(count: ForensicCounter, registry: CollectorRegistry = REGISTRY) -> None:
    """Register the forensic gauges once per process; later calls swap the counting function (as for states)."""
    global _forensic_collector
    with _state_lock:
        if _forensic_collector is None:
            _forensic_collector = ForensicCollector(count)
            registry.register(_forensic_collector)
        else:
            _forensic_collector.count = count


def metrics_payload(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The text exposition of every registered metric and its content type, for the `/metrics` route."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve this process's metrics on their own port (for Celery workers, which have no HTTP app)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr)
