"""A series' next model pass run on a thread of its own while the scoring thread finishes the batch before it.

Why: after each pass the scoring thread turns residuals into anomaly maps, cues and regions (numpy, mostly
on one core: ~0.08 s per B70f slice), and decodes the next slices; done in turn with the pass, the pass's
threads wait meanwhile. With the next pass already running, both cores stay busy: on the 2-core VM a B70f
series scored 0.339-0.358 -> 0.322-0.327 s per slice (docs/bench/scoring.md). Results are the same: each
batch is finished in order, from the same residuals.

One thread per detector, created at first use and again in a forked child (its parent's thread did not
survive the fork). Switched off (`enabled = False`), `submit` runs the function at once on the caller's
thread, as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class PassAhead:
    """`submit(fn, *args)` -> a Future of fn(*args), run on this object's own thread (in submission order)."""

    def __init__(self) -> None:
        self.enabled = True
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        if not self.enabled:
            done: Future[T] = Future()
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # the caller sees it at .result(), as from the thread
                done.set_exception(exc)
            return done
        if self._executor is None or self._pid != os.getpid():
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="btd-pass-ahead")
            self._pid = os.getpid()
        return self._executor.submit(fn, *args)
