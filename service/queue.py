"""Hand work to the workers by task name: `dispatch("btd.score_study", study_uid)`.

Why by name: the gateway never imports worker code (it may run on a machine without the model), so with
a broker (BTD_BROKER_URL) it sends a Celery message by name to BTD_QUEUE_NAME. Without a broker the same
tasks run in one background thread of this process (`btd serve`): the thread resolves the name through
`worker.tasks.TASKS` (imported only when the first task runs) and runs tasks one at a time, like a Celery
worker with concurrency 1. A task may dispatch its follow-up task through the same function.

Nothing is lost if a queued entry is: the database holds every study's state, and the stability monitor
re-dispatches what a lost queue forgot (see service/stability.py). An unknown task name is logged as an
error, never raised into the caller's thread.
"""

from __future__ import annotations

import importlib
import logging
import queue as stdlib_queue
import threading
from collections.abc import Callable
from typing import Any

from service.observability.logs import correlation, current_correlation_id, log_event
from service.settings import Settings, get_settings

log = logging.getLogger("btd.queue")

TASK_REGISTRY_MODULE = "worker.tasks"

_STOP = object()


def resolve_task(name: str) -> Callable[..., Any] | None:
    """The function registered under `name` in worker.tasks.TASKS, or None."""
    module = importlib.import_module(TASK_REGISTRY_MODULE)
    tasks: dict[str, Callable[..., Any]] = getattr(module, "TASKS", {}) or {}
    return tasks.get(name)


class InProcessExecutor:
    """A daemon thread running dispatched tasks in order, one at a time."""

    def __init__(self, resolver: Callable[[str], Callable[..., Any] | None] = resolve_task) -> None:
        self._queue: stdlib_queue.Queue[Any] = stdlib_queue.Queue()
        self._resolver = resolver
        self._thread = threading.Thread(target=self._run, name="btd-executor", daemon=True)
        self.failures = 0
        self.completed = 0

    def start(self) -> InProcessExecutor:
        self._thread.start()
        log_event(log, "executor.started")
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, name: str, args: tuple[Any, ...]) -> None:
        self._queue.put((name, args, current_correlation_id()))

    def depth(self) -> int:
        return self._queue.qsize()

    def join_idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted task has run (tests); True if the queue drained in time."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> bool:
        """Finish the running task (up to `timeout`) and stop; queued tasks are dropped (the db keeps them).
        Returns False if a task is still running when the time is up."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                name, args, correlation_id = item
                with correlation(correlation_id):
                    self._run_one(name, args)
            finally:
                self._queue.task_done()

    def _run_one(self, name: str, args: tuple[Any, ...]) -> None:
        try:
            func = self._resolver(name)
        except Exception:
            self.failures += 1
            log.exception("task.unresolvable")
            return
        if func is None:
            self.failures += 1
            log_event(log, "task.unknown", logging.ERROR, task=name)
            return
        try:
            func(*args)
            self.completed += 1
        except Exception:
            self.failures += 1
            log.exception("task.failed", extra={"event": "task.failed", "fields": {"task": name}})


_lock = threading.Lock()
_executor: InProcessExecutor | None = None
_celery_clients: dict[str, Any] = {}


def start_executor() -> InProcessExecutor:
    """The process's in-process executor, started if it is not running."""
    global _executor
    with _lock:
        if _executor is None or not _executor.alive:
            _executor = InProcessExecutor().start()
        return _executor


def stop_executor(timeout: float = 10.0) -> bool:
    """Stop the in-process executor; False if a task (e.g. a scoring job) was still running at the timeout."""
    global _executor
    with _lock:
        executor, _executor = _executor, None
    return executor.stop(timeout) if executor is not None else True


def current_executor() -> InProcessExecutor | None:
    return _executor


def _celery_client(broker_url: str) -> Any:
    with _lock:
        client = _celery_clients.get(broker_url)
        if client is None:
            from celery import Celery

            client = _celery_clients[broker_url] = Celery("btd-gateway", broker=broker_url)
        return client


def dispatch(task_name: str, *args: Any, settings: Settings | None = None) -> None:
    """Send a task by name: to Celery when a broker is set, else to the in-process executor."""
    settings = settings or get_settings()
    if settings.broker_url:
        _celery_client(settings.broker_url).send_task(task_name, args=list(args), queue=settings.queue_name)
        log_event(log, "task.sent", task=task_name, queue=settings.queue_name, args=[str(a) for a in args])
        return
    start_executor().submit(task_name, args)
    log_event(log, "task.queued_in_process", task=task_name, args=[str(a) for a in args])


def queue_depth(settings: Settings | None = None) -> int | None:
    """Messages waiting: the Redis list of the queue, or the in-process queue; None if unknown."""
    settings = settings or get_settings()
    if not settings.broker_url:
        return _executor.depth() if _executor is not None else 0
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    try:
        import redis

        client = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
        return int(client.llen(settings.queue_name))
    except Exception:
        return None
