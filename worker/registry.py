"""Every task of the worker by name, bound to one process's settings: what the in-process executor runs.

Why here and not looked up by name at run time: the composition root (`btd serve` without a broker) hands
this table to core.queue's executor when the process starts, so the gateway never imports worker code and
nothing resolves a module by a string. A Celery worker needs no table: its tasks register themselves on
the Celery app under the same names (core.contracts.Task).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from core.contracts import Task
from core.settings import Settings
from worker import report_tasks, tasks


def in_process_tasks(settings: Settings) -> dict[str, Callable[..., Any]]:
    """{task name: function of the task's message arguments}, each bound to `settings`."""
    return {
        Task.SCORE_STUDY.value: partial(tasks.score_study, settings=settings),
        Task.BUILD_REPORT.value: partial(report_tasks.build_report, settings=settings),
        Task.DELIVER_REPORT.value: partial(report_tasks.deliver_report, settings=settings),
    }
