"""Task dispatch (core/queue.py): one backoff for every retried step, delayed tasks that never hold up the
in-process executor, and a clear error where no one would run a task."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from core import queue
from core.contracts import Task
from core.settings import Settings


def test_one_backoff_doubles_and_is_capped_for_every_step() -> None:
    """Scoring and delivery used to have two copies (capped at 600 s and 3600 s); there is one now."""
    assert [queue.backoff_seconds(10, n) for n in range(4)] == [10, 20, 40, 80]
    assert queue.backoff_seconds(30, 10) == queue.MAX_BACKOFF_SECONDS == 600


def test_a_task_waiting_for_its_retry_does_not_hold_up_the_executor() -> None:
    """In-process, a retry waits on a timer: a task submitted after it runs first (before, a scoring retry
    slept in the executor's only thread, and every other study waited behind it)."""
    ran: list[str] = []
    done = threading.Event()

    def record(value: str) -> None:
        ran.append(value)
        if len(ran) == 2:
            done.set()

    executor = queue.InProcessExecutor({"t": record}.get).start()
    try:
        started = time.monotonic()
        executor.submit_later(1.0, "t", ("retried",))
        executor.submit("t", ("other study",))
        assert done.wait(30)
        assert ran == ["other study", "retried"]
        assert time.monotonic() - started >= 1.0
    finally:
        executor.stop()


def test_stopping_the_executor_cancels_delayed_tasks() -> None:
    ran: list[str] = []
    executor = queue.InProcessExecutor({"t": ran.append}.get).start()
    executor.submit_later(0.3, "t", ("late",))
    assert executor.stop()
    time.sleep(0.6)
    assert ran == []


def test_dispatch_without_broker_or_executor_fails_where_it_is_called(tmp_path: Path) -> None:
    """Only `btd serve` runs an in-process executor; anyone else dispatching without a broker is told so."""
    queue.stop_executor()
    with pytest.raises(queue.NoExecutorError, match="BTD_BROKER_URL"):
        queue.dispatch(Task.SCORE_STUDY, "2.25.1", settings=Settings(data_dir=tmp_path))
