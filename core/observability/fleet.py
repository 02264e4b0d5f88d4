"""Celery workers' heartbeats, with their metrics, kept in Redis: who is alive, and what they counted.

Why a Redis key per worker with a time to live: the gateway must tell whether any worker consumes its
queues (`/readyz` says "no worker seen" otherwise) without asking the workers a question that a busy one
answers late (a Celery ping waits on the worker's main loop, which a long task can hold). Each worker
process sets `<BTD_QUEUE_NAME>.worker.<host:pid>` every BTD_WORKER_HEARTBEAT_SECONDS from a thread of its
own, with a time to live of BTD_WORKER_ABSENT_SECONDS: a dead worker's key simply expires.

Why the metrics travel in the same key: a worker's counters (scoring time, task outcomes, deliveries) live
in the worker's process, which has no HTTP server a Prometheus behind a firewall could reach; the gateway's
`/metrics` re-exposes each live worker's latest families with a `worker` label (`merged_payload`), so one
scrape target shows the whole deployment. A worker gone for longer than the time to live drops out of the
exposition; Prometheus treats a counter that starts again from zero under a new `worker` label as a new
series, so nothing is double counted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from core.observability.logs import log_event
from core.settings import Settings

log = logging.getLogger("btd.fleet")

# Only btd's own families travel: the process and platform collectors of every worker would drown them.
METRIC_PREFIX = "btd_"


def heartbeat_prefix(settings: Settings) -> str:
    """Keys carry the queue name, like Celery's own bookkeeping keys, so deployments sharing a Redis
    database never count each other's workers."""
    return f"{settings.queue_name}.worker."


@dataclass(frozen=True)
class Heartbeat:
    worker: str  # host:pid
    queues: tuple[str, ...]  # the roles it consumes (core.contracts.QueueRole values)
    at: float  # Unix time of the beat
    metrics: str  # Prometheus text exposition of its btd_ families


def own_metrics(registry: CollectorRegistry = REGISTRY) -> str:
    """This process's btd_ metric families as exposition text."""

    class _Ours:
        def collect(self) -> Iterator[Metric]:
            return (family for family in registry.collect() if family.name.startswith(METRIC_PREFIX))

    return generate_latest(_Ours()).decode()  # type: ignore[arg-type]


def _redis(settings: Settings) -> Any:
    import redis

    assert settings.broker_url is not None
    return redis.Redis.from_url(settings.broker_url, socket_timeout=3, socket_connect_timeout=3)


def publish(settings: Settings, worker: str, queues: Iterable[str], metrics: str, client: Any = None) -> None:
    """Set this worker's key, to expire after BTD_WORKER_ABSENT_SECONDS."""
    beat = {"worker": worker, "queues": list(queues), "at": time.time(), "metrics": metrics}
    own = client is None
    client = client or _redis(settings)
    try:
        ttl = max(1, int(settings.worker_absent_seconds))
        client.set(heartbeat_prefix(settings) + worker, json.dumps(beat), ex=ttl)
    finally:
        if own:
            client.close()


def read_heartbeats(settings: Settings) -> list[Heartbeat] | None:
    """Every live worker's latest heartbeat; None when the broker cannot be read (or is not Redis)."""
    if not (settings.broker_url and settings.broker_url.startswith(("redis://", "rediss://"))):
        return None
    try:
        client = _redis(settings)
        try:
            keys = sorted(client.scan_iter(match=heartbeat_prefix(settings) + "*", count=200))
            values = client.mget(keys) if keys else []
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - an unreachable broker is a readiness failure of its own
        return None
    beats = []
    for raw in values:
        try:
            data = json.loads(raw)
            beats.append(Heartbeat(str(data["worker"]), tuple(data["queues"]), float(data["at"]), str(data["metrics"])))
        except (TypeError, ValueError, KeyError):
            continue  # expired between SCAN and MGET, or not ours
    return beats


class HeartbeatPublisher:
    """A daemon thread publishing this process's heartbeat (and metrics) every BTD_WORKER_HEARTBEAT_SECONDS.

    Started in each Celery pool process (worker/main.py), where the tasks run and count."""

    def __init__(self, settings: Settings, worker: str, queues: Iterable[str]) -> None:
        self.settings = settings
        self.worker = worker
        self.queues = tuple(queues)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="btd-heartbeat", daemon=True)
        self.published = 0

    def start(self) -> HeartbeatPublisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def beat(self) -> None:
        publish(self.settings, self.worker, self.queues, own_metrics())
        self.published += 1

    def _run(self) -> None:
        failing = False
        while True:
            try:
                self.beat()
                if failing:
                    log_event(log, "heartbeat.restored", worker=self.worker)
                failing = False
            except Exception as exc:  # noqa: BLE001 - the broker may be down for a while; keep beating
                if not failing:
                    log_event(log, "heartbeat.failed", logging.WARNING, worker=self.worker, error=str(exc))
                failing = True
            if self._stop.wait(self.settings.worker_heartbeat_seconds):
                return


def merged_payload(beats: Iterable[Heartbeat], registry: CollectorRegistry = REGISTRY) -> bytes:
    """The exposition of `registry` with every worker's families merged in, each sample labelled with its
    `worker`. Families are merged by name because an exposition may name a family only once; a worker's
    family whose type differs from the gateway's one of the same name is left out (never half-merged)."""
    families: dict[str, Metric] = {}
    for family in registry.collect():
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = list(family.samples)
        families[family.name] = copy
    for beat in beats:
        try:
            parsed = list(text_string_to_metric_families(beat.metrics))
        except ValueError:
            continue
        for family in parsed:
            if family.name.endswith("_created"):
                continue  # the text format writes a counter's creation time as a gauge of its own: noise here
            target = families.get(family.name)
            if target is None:
                target = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            elif target.type != family.type:
                continue
            target.samples.extend(
                Sample(s.name, {**s.labels, "worker": beat.worker}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            return iter(families.values())

    return generate_latest(_Merged())  # type: ignore[arg-type]
