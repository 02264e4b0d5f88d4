"""`btd worker`: one Celery worker process that scores studies and builds and delivers their reports.

One task at a time by default (`--concurrency 1`, prefetch 1): on the CPU the model holds every core, and a
worker that took a second message would only make it wait. Start several CPU workers; they coordinate
through the database, never with each other. On a GPU the model pass is the small part of a slice and the
per-slice work on the CPU the large one: BTD_WORKER_PROCESSES=N runs N pool processes (the prefork pool),
each with its own model, lease and share of the cores (16 on one H200: 88 slices/s against 7 for one,
docs/bench/gpu.md); BTD_STUDIES_IN_PARALLEL=N instead runs N studies on a pool of threads in one process
sharing one model, whose passes merge across the studies (models/merged_passes.py). The model is loaded in
each pool process on its first study, never in the parent, so CUDA is first touched after the fork.

Which queues: both by default (BTD_WORKER_QUEUES=scoring,reports); `btd worker --queues reports` makes a
worker that only builds and delivers reports (no model is ever loaded by it), so a site can keep reports
flowing however long the scoring queue is.

Each pool process publishes a heartbeat with its metrics to Redis (core.observability.fleet) from a thread
of its own: the gateway's `/readyz` knows a worker is alive, and its `/metrics` shows the worker's counts.
"""

from __future__ import annotations

import logging
from typing import Any

from core.contracts import QueueRole
from core.observability.fleet import HeartbeatPublisher
from core.observability.logs import configure_logging, log_event
from core.queue import broker_queues
from core.settings import Settings
from worker import celery_app
from worker.lease import worker_id

log = logging.getLogger("btd.worker")


def run_worker(settings: Settings, extra_args: list[str] | None = None) -> int:
    """Configure the Celery app from `settings`, register the tasks, and run the worker until it stops."""
    configure_logging(settings.log_level)
    if not settings.broker_url:
        log_event(log, "worker.no_broker", logging.ERROR, hint="set BTD_BROKER_URL (btd serve runs tasks itself)")
        return 2
    app = celery_app.configure(settings)
    from worker import report_tasks, tasks  # noqa: F401 - importing registers the tasks on the app

    roles = [QueueRole(role) for role in settings.worker_queues]
    if settings.studies_in_parallel > 1:  # the tasks run on threads of this process: its heartbeat has their metrics
        HeartbeatPublisher(settings, worker_id(), [role.value for role in roles]).start()
    else:
        start_heartbeat_in_pool_processes(settings, roles)
    app.worker_main(argv=worker_argv(settings, roles, extra_args))
    return 0


def worker_argv(settings: Settings, roles: list[QueueRole], extra_args: list[str] | None = None) -> list[str]:
    """Celery's command line: one study per pool process (BTD_WORKER_PROCESSES of them, the prefork pool), or
    BTD_STUDIES_IN_PARALLEL on threads of this one."""
    studies = settings.studies_in_parallel
    if studies > 1:
        pool = ["--pool", "threads", "--concurrency", str(studies)]
    else:
        pool = ["--pool", "prefork", "--concurrency", str(settings.worker_processes)]
    return [
        "worker",
        "-Q",
        ",".join(broker_queues(settings, roles)),
        *pool,
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        settings.log_level,
        *(extra_args or []),
    ]


def start_heartbeat_in_pool_processes(settings: Settings, roles: list[QueueRole]) -> None:
    """Publish a heartbeat from each pool process, where the tasks run and count their metrics (a forked
    child's counters are its own); the parent's would say nothing about the child doing the work."""
    from celery.signals import worker_process_init

    def start(**_kwargs: Any) -> None:
        HeartbeatPublisher(settings, worker_id(), [role.value for role in roles]).start()

    worker_process_init.connect(start, weak=False)
