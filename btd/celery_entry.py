"""The Celery app for the `celery` command line, configured from this process's settings.

`celery -A btd.celery_entry:app inspect ping` (the worker's health check in docker-compose.yml) loads this
module when that command starts; `btd worker` configures the same app itself.
"""

from __future__ import annotations

from core.settings import get_settings
from worker import report_tasks, tasks  # noqa: F401 - importing registers the tasks on the app
from worker.celery_app import configure

app = configure(get_settings())
