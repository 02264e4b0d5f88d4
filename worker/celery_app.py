"""The Celery application of the btd workers, on the Redis broker named by BTD_BROKER_URL.

Why these options: a scoring job runs for minutes and must survive a worker that dies mid-job, so a
message is acknowledged only after the task returns (`task_acks_late`), a worker takes one message at a
time (`worker_prefetch_multiplier=1`, so a slow study does not hold others hostage), and a message whose
worker was killed goes back to the queue (`task_reject_on_worker_lost`). Redis re-delivers an unacked
message after `visibility_timeout` (a backstop: a whole worker lost with its parent process is noticed
sooner by its study's lease running out, core/liveness.py); the study's state machine in the database
(not Celery) stops a re-delivered message from scoring twice. No result backend: the database is the
truth. Scoring and report tasks travel on separate queues (`task_routes`, core.contracts.QueueRole), so
a report never waits behind other studies' scoring.

Why the app is configured by `configure`, not at import: the tasks register themselves on `app` when
their modules are imported, but which broker, queue and timeouts apply is the process's settings, read
once when the process starts (the composition root: `btd worker`, or `btd.celery_entry` for the `celery`
command line).
"""

from __future__ import annotations

from celery import Celery

from core.contracts import TASK_QUEUE_ROLE, queue_name
from core.settings import Settings

app = Celery("btd", set_as_current=False)

_settings: Settings | None = None


def configured_settings() -> Settings:
    """The settings this worker process was configured with (`configure`)."""
    if _settings is None:
        raise RuntimeError("the Celery app is not configured: start workers with `btd worker`")
    return _settings


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


def celery_config(settings: Settings) -> dict[str, object]:
    """Everything the Celery app takes from the settings."""
    return {
        "broker_url": settings.broker_url or "redis://127.0.0.1:6379/0",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.queue_name,
        "task_routes": {t.value: {"queue": queue_name(settings.queue_name, r)} for t, r in TASK_QUEUE_ROLE.items()},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "worker_hijack_root_logger": False,
        "worker_max_tasks_per_child": None,
        "timezone": "UTC",
        "enable_utc": True,
    }


def configure(settings: Settings) -> Celery:
    """Configure this process's Celery app (and its tasks) from `settings`; returns the app."""
    global _settings
    _settings = settings
    app.conf.update(celery_config(settings))
    return app
