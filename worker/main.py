"""`btd worker`: one Celery worker process that scores studies and builds and delivers their reports.

One task at a time (`--concurrency 1`, prefetch 1): the model holds the GPU (or the CPU's cores), and a
worker that took a second message would only make it wait. Start one process per GPU, or several CPU
workers; they coordinate through the database, never with each other.
"""

from __future__ import annotations

import logging

from core.observability.logs import configure_logging, log_event
from core.settings import Settings
from worker import celery_app

log = logging.getLogger("btd.worker")


def run_worker(settings: Settings, extra_args: list[str] | None = None) -> int:
    """Configure the Celery app from `settings`, register the tasks, and run the worker until it stops."""
    configure_logging(settings.log_level)
    if not settings.broker_url:
        log_event(log, "worker.no_broker", logging.ERROR, hint="set BTD_BROKER_URL (btd serve runs tasks itself)")
        return 2
    app = celery_app.configure(settings)
    from worker import report_tasks, tasks  # noqa: F401 - importing registers the tasks on the app

    argv = [
        "worker",
        "-Q",
        settings.queue_name,
        "--concurrency",
        "1",
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        settings.log_level,
        *(extra_args or []),
    ]
    app.worker_main(argv=argv)
    return 0
