"""Hand work to the workers by task name: `dispatch(Task.SCORE_STUDY, study_uid)`.

Why by name: the gateway and the worker never import each other (they may run on different machines), so
with a broker (BTD_BROKER_URL) a Celery message is sent by name. Without a broker the same tasks run in
one background thread of `btd serve`, an `InProcessExecutor`; the composition root (`btd.runtime`) hands
it the worker's task table when the process starts, so nothing here looks code up by name at run time. A
task dispatches its follow-up (or its own retry, with a `countdown`) through the same function, in either
mode.

Nothing is lost if a queued entry is: the database holds every study's state, and the stability monitor
re-dispatches what a lost queue forgot (see service/stability.py). An unknown task name is logged as an
error, never raised into the caller's thread.
"""

from __future__ import annotations

import logging
import queue as stdlib_queue
import threading
from collections.abc import Callable
from typing import Any

from core.contracts import Task
from core.observability.logs import correlation, current_correlation_id, log_event
from core.settings import Settings

log = logging.getLogger("btd.queue")

TaskFunction = Callable[..., Any]
Resolver = Callable[[str], TaskFunction | None]

# The longest wait before a retry, whatever step: a PACS or database back after an outage is tried again
# within ten minutes.
MAX_BACKOFF_SECONDS = 600.0

_STOP = object()


class NoExecutorError(RuntimeError):
    """In-process mode, but this process runs no task executor (only `btd serve` runs one)."""


def backoff_seconds(base: float, retries_done: int, cap: float = MAX_BACKOFF_SECONDS) -> float:
    """Exponential backoff for every retried step: base, 2*base, 4*base, ... capped, so a flapping
    dependency is not hammered and a long outage is still retried promptly once it ends."""
    return min(cap, base * (2**retries_done))


class InProcessExecutor:
    """A daemon thread running dispatched tasks in order, one at a time, like a Celery worker with
    concurrency 1. `submit_later` waits on a timer thread, never in the executor's own thread, so a task
    waiting to be retried does not hold up every other study."""

    def __init__(self, resolver: Resolver) -> None:
        self._queue: stdlib_queue.Queue[Any] = stdlib_queue.Queue()
        self._resolver = resolver
        self._thread = threading.Thread(target=self._run, name="btd-executor", daemon=True)
        self._timers: set[threading.Timer] = set()
        self._timers_lock = threading.Lock()
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

    def submit_later(self, delay: float, name: str, args: tuple[Any, ...]) -> None:
        """Submit after `delay` seconds. A timer lost with the process is harmless: the stability monitor
        finds the study where it was left and dispatches it again."""
        correlation_id = current_correlation_id()

        def fire() -> None:
            with self._timers_lock:
                self._timers.discard(timer)
            self._queue.put((name, args, correlation_id))

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._timers_lock:
            self._timers.add(timer)
        timer.start()

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
        """Finish the running task (up to `timeout`) and stop; queued and delayed tasks are dropped (the
        database keeps their studies). Returns False if a task is still running when the time is up."""
        with self._timers_lock:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
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
        func = self._resolver(name)
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


def start_executor(resolver: Resolver) -> InProcessExecutor:
    """Start this process's in-process executor with the task table it runs (the composition root's job).
    A running one is kept."""
    global _executor
    with _lock:
        if _executor is None or not _executor.alive:
            _executor = InProcessExecutor(resolver).start()
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

            client = _celery_clients[broker_url] = Celery("btd-dispatch", broker=broker_url)
        return client


def dispatch(task: Task | str, *args: Any, settings: Settings, countdown: float | None = None) -> None:
    """Send a task by name: to Celery when a broker is set, else to this process's executor.

    `countdown`: run it no sooner than this many seconds from now (a retry's backoff). Raises
    NoExecutorError in in-process mode when this process runs no executor: a caller outside `btd serve`
    (a CLI command, a test) must start one or set a broker.
    """
    name = task.value if isinstance(task, Task) else str(task)
    if settings.broker_url:
        _celery_client(settings.broker_url).send_task(
            name, args=list(args), queue=settings.queue_name, countdown=countdown
        )
        log_event(log, "task.sent", task=name, queue=settings.queue_name, args=[str(a) for a in args])
        return
    executor = _executor
    if executor is None or not executor.alive:
        raise NoExecutorError(f"no in-process executor runs in this process to take {name}; set BTD_BROKER_URL")
    if countdown:
        executor.submit_later(countdown, name, args)
    else:
        executor.submit(name, args)
    log_event(log, "task.queued_in_process", task=name, args=[str(a) for a in args], countdown=countdown)


def queue_depth(settings: Settings) -> int | None:
    """Messages waiting: the Redis list of the queue, or the in-process queue; None if unknown."""
    if not settings.broker_url:
        return _executor.depth() if _executor is not None else 0
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    try:
        import redis

        client = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return int(client.llen(settings.queue_name))
        finally:
            client.close()
    except Exception:
        return None
