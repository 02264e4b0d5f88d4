"""Prometheus metrics of the whole flow, defined once so every part counts into the same names."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

INSTANCES_RECEIVED = Counter(
    "btd_instances_received_total", "C-STORE requests handled, by outcome", ["status"]
)
BYTES_RECEIVED = Counter("btd_bytes_received_total", "Bytes of DICOM instances stored in the spool")
ASSOCIATIONS = Counter("btd_associations_total", "DICOM associations, by outcome", ["outcome"])
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
