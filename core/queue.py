"""Hand work to the workers by task name: `dispatch(Task.SCORE_STUDY, study_uid)`.

Why by name: the gateway and the worker never import each other (they may run on different machines), so
with a broker (BTD_BROKER_URL) a Celery message is sent by name. Without a broker the same tasks run in
one background thread of `btd serve`, an `InProcessExecutor`; the composition root (`btd.runtime`) hands
it the worker's task table when the process starts, so nothing here looks code up by name at run time. A
task dispatches its follow-up (or its own retry, with a `countdown`) through the same function, in either
mode.

With a broker each task goes to its role's queue (core.contracts.TASK_QUEUE_ROLE): scoring to
BTD_QUEUE_NAME, report building and delivery to BTD_QUEUE_NAME + ".reports", so a report never waits
behind other studies' scoring. `waiting_messages` says which (task, study) messages wait in the queues, in
either mode: the stability monitor re-dispatches a step only when its message is not there.

Nothing is lost if a queued entry is: the database holds every study's state, and the stability monitor
re-dispatches what a lost queue forgot (see service/stability.py). An unknown task name is logged as an
error, never raised into the caller's thread.
"""

from __future__ import annotations

import base64
import json
import logging
import queue as stdlib_queue
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from core.contracts import TASK_QUEUE_ROLE, QueueRole, Task, queue_name
from core.observability.logs import correlation, current_correlation_id, log_event
from core.settings import Settings

log = logging.getLogger("btd.queue")

TaskFunction = Callable[..., Any]
Resolver = Callable[[str], TaskFunction | None]
WaitingKey = tuple[str, str]  # (task name, study UID): one message for one study step

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
        self._pending: Counter[WaitingKey] = Counter()  # queued, on a timer, or running
        self._pending_lock = threading.Lock()
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
        self._hold(name, args, +1)
        self._queue.put((name, args, current_correlation_id()))

    def _hold(self, name: str, args: tuple[Any, ...], change: int) -> None:
        if not args:
            return
        key = (name, str(args[0]))
        with self._pending_lock:
            self._pending[key] += change
            if self._pending[key] <= 0:
                del self._pending[key]

    def waiting(self) -> set[WaitingKey]:
        """(task, study) of every task queued, waiting on its timer or running now."""
        with self._pending_lock:
            return set(self._pending)

    def submit_later(self, delay: float, name: str, args: tuple[Any, ...]) -> None:
        """Submit after `delay` seconds. A timer lost with the process is harmless: the stability monitor
        finds the study where it was left and dispatches it again."""
        correlation_id = current_correlation_id()
        self._hold(name, args, +1)

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
                try:
                    with correlation(correlation_id):
                        self._run_one(name, args)
                finally:
                    self._hold(name, args, -1)
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
        target = queue_for(name, settings)
        _celery_client(settings.broker_url).send_task(name, args=list(args), queue=target, countdown=countdown)
        log_event(log, "task.sent", task=name, queue=target, args=[str(a) for a in args], countdown=countdown)
        return
    executor = _executor
    if executor is None or not executor.alive:
        raise NoExecutorError(f"no in-process executor runs in this process to take {name}; set BTD_BROKER_URL")
    if countdown:
        executor.submit_later(countdown, name, args)
    else:
        executor.submit(name, args)
    log_event(log, "task.queued_in_process", task=name, args=[str(a) for a in args], countdown=countdown)


def queue_for(task: Task | str, settings: Settings) -> str:
    """The broker queue that carries `task` (an unknown name goes to the scoring queue, the default)."""
    try:
        role = TASK_QUEUE_ROLE[Task(task)]
    except ValueError:
        role = QueueRole.SCORING
    return queue_name(settings.queue_name, role)


def broker_queues(settings: Settings, roles: list[str] | None = None) -> list[str]:
    """The broker queues of `roles` (default: every role), in role order."""
    wanted = [QueueRole(r) for r in (roles if roles is not None else list(QueueRole))]
    return [queue_name(settings.queue_name, role) for role in QueueRole if role in wanted]


def _redis_client(settings: Settings) -> Any:
    import redis

    assert settings.broker_url is not None
    return redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)


def _uses_redis(settings: Settings) -> bool:
    return bool(settings.broker_url and settings.broker_url.startswith(("redis://", "rediss://")))


def queue_depth(settings: Settings) -> int | None:
    """Messages waiting: the Redis lists of both queues, or the in-process queue; None if unknown."""
    if not settings.broker_url:
        return _executor.depth() if _executor is not None else 0
    if not _uses_redis(settings):
        return None
    try:
        client = _redis_client(settings)
        try:
            return sum(int(client.llen(name)) for name in broker_queues(settings))
        finally:
            client.close()
    except Exception:
        return None


def _message_key(raw: bytes) -> WaitingKey | None:
    """(task name, first argument) of one Celery message as kombu keeps it in a Redis list (JSON with the
    task name in its headers and the arguments base64-encoded in its body); None if it is not one."""
    try:
        message = json.loads(raw)
        name = message["headers"]["task"]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return (str(name), str(args[0])) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def waiting_messages(settings: Settings) -> set[WaitingKey] | None:
    """(task, study UID) of every message waiting for a worker: in the Redis lists of our queues, or in the
    in-process executor (queued, on a retry timer, or running). None when it cannot be known (the broker is
    unreachable, or not Redis): the caller then goes by deadlines alone.

    Why only the lists and not Celery's unacknowledged set: a message there belongs to a worker, and
    whether that worker still lives is the lease's business (a dead worker's message stays there until the
    visibility timeout); the database's lease and retry time say more than the broker can.
    """
    if not settings.broker_url:
        return _executor.waiting() if _executor is not None else set()
    if not _uses_redis(settings):
        return None
    try:
        client = _redis_client(settings)
        try:
            raw = [item for name in broker_queues(settings) for item in client.lrange(name, 0, -1)]
        finally:
            client.close()
    except Exception:
        return None
    return {key for key in map(_message_key, raw) if key is not None}
