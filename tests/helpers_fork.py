"""Running a function in a forked child (multiprocessing), as a Celery prefork worker runs scoring: what a
parent's threads left behind must not make the child wait for threads that did not survive the fork."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

import pytest


def _child(target: Callable[..., Any], args: tuple[Any, ...], queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(target(*args))


def result_in_forked_child(target: Callable[..., Any], *args: Any, timeout: float = 60) -> Any:
    """target(*args) in a forked child; the test fails (and the child is killed) if it does not finish in time."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(target, args, queue), daemon=True)
    child.start()
    child.join(timeout=timeout)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"the forked child did not finish in {timeout} s: it waited for its parent's threads")
    assert child.exitcode == 0, f"the forked child failed (exit code {child.exitcode})"
    return queue.get(timeout=5)
