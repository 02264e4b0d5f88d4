"""The Celery application of the btd workers, on the Redis broker named by BTD_BROKER_URL.

Why these options: a scoring job runs for minutes and must survive a worker that dies mid-job, so a
message is acknowledged only after the task returns (`task_acks_late`), a worker takes one message at a
time (`worker_prefetch_multiplier=1`, so a slow study does not hold others hostage), and a message whose
worker was killed goes back to the queue (`task_reject_on_worker_lost`). Redis re-delivers an unacked
message after `visibility_timeout`, so that timeout must be longer than the longest job; the study's
state machine in the database (not Celery) stops a re-delivered message from scoring twice. No result
backend: the database is the truth.
"""

from __future__ import annotations

import importlib.util

from celery import Celery

from service.settings import Settings, get_settings

# Task modules the worker loads; report tasks belong to the reports area and may be absent.
TASK_MODULES = ("worker.tasks", "worker.report_tasks")



def score_retries(settings: Settings) -> int:
    """How many times a failing scoring job is retried before the study is FAILED."""
    return settings.score_retries


def retry_backoff_seconds(settings: Settings) -> float:
    """The first retry's delay; each later retry doubles it."""
    return settings.score_backoff_seconds


def backoff_delay(settings: Settings, retries_done: int, cap: float = 600.0) -> float:
    """Exponential backoff: base, 2*base, 4*base, ... capped, so a flapping dependency is not hammered."""
    return min(cap, retry_backoff_seconds(settings) * (2**retries_done))


def available_task_modules() -> list[str]:
    """The task modules that exist in this installation (the reports area may not be deployed yet)."""
    return [name for name in TASK_MODULES if importlib.util.find_spec(name) is not None]


def transport_options(settings: Settings) -> dict[str, object]:
    """Redis transport options: when and how an unacknowledged message comes back.

    - `visibility_timeout`: a message not acked this long after delivery is re-delivered (its worker is
      presumed dead), so it must exceed the longest job; the study lease (worker/tasks.py) stops a
      re-delivery of a live job from scoring twice.
    - the sweep that re-delivers runs by default only every ~100 s (10 s x a throttle of 10); we sweep
      every quarter of the timeout (at most a minute) so a killed worker's study comes back promptly.
    - the bookkeeping keys carry the queue name: kombu's default keys are shared by every Celery app
      on the Redis database, and a worker with a short timeout would re-deliver other deployments'
      long-running messages.
    """
    queue = settings.queue_name
    return {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": max(1, min(60, settings.visibility_timeout // 4)),
        "unacked_restore_throttle": 1,
        "unacked_key": f"{queue}.unacked",
        "unacked_index_key": f"{queue}.unacked_index",
        "unacked_mutex_key": f"{queue}.unacked_mutex",
    }


def create_celery_app(settings: Settings | None = None) -> Celery:
    """Build the Celery app from the settings (tests build their own with a unique queue name)."""
    settings = settings or get_settings()
    app = Celery("btd", broker=settings.broker_url or "redis://127.0.0.1:6379/0", include=available_task_modules())
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue_name,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        worker_hijack_root_logger=False,
        worker_max_tasks_per_child=None,
        timezone="UTC",
        enable_utc=True,
    )
    return app


app = create_celery_app()
