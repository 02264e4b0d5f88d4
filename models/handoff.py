"""Batches taken in turns: callers queue work, one of them at a time runs what is queued for all of them.

Why one primitive: the listener commits the rows of concurrent C-STOREs together (service/dicom/
group_commit.py) and the detector runs the model passes of concurrent series together (models/
merged_passes.py); both need the same hand-over, with no timer and no thread of their own, and it is easy
to get subtly wrong (a caller left asleep, a queue left with nobody leading). It lives in `models` because
that is the package every other one may import; it imports nothing but the standard library.

How: a caller queues its `Waiter` and, if nobody leads, leads: it takes a batch from the queue (its own
first; `take` chooses which others join it), runs it, marks the batch done and wakes it, then hands the lead
to the first caller still queued. Callers that queued meanwhile sleep, each on its own event: waking every
waiter after each batch (one condition, notify_all) cost 9 % of the listener's GIL time with four
associations (py-spy), most of it for threads that only went back to sleep. With one caller there is
nothing to wait for: it runs its own work on its own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar


@dataclass(kw_only=True, eq=False)
class Waiter:
    """One caller's place in the queue; `run` sets `error` for a caller whose work failed."""

    done: bool = False
    error: BaseException | None = None
    wake: threading.Event = field(default_factory=threading.Event)  # set when done, or when handed the lead


W = TypeVar("W", bound=Waiter)
Take = Callable[[list[W]], tuple[list[W], list[W]]]  # queue -> (batch, the rest still queued)


class Handoff(Generic[W]):
    """Run queued callers' work in batches, one batch at a time, on the callers' own threads."""

    def __init__(self, take: Take[W], run: Callable[[list[W]], None]) -> None:
        self._take = take
        self._run = run  # records each waiter's outcome (or error); must not raise for one waiter's fault
        # Invariant: while nobody leads, the queue is empty (a leader steps down only then).
        self._queue: list[W] = []
        self._leading = False
        self._lock = threading.Lock()

    @property
    def leading(self) -> bool:
        return self._leading

    @property
    def queued(self) -> int:
        return len(self._queue)

    def wait_turn(self, mine: W) -> None:
        """Return once `mine` is done (run in a batch, led by this thread or another); raise its error."""
        with self._lock:
            self._queue.append(mine)
            leads = not self._leading
            self._leading = True
        if not leads:
            mine.wake.wait()  # done, or handed the lead: then `mine` is first in the queue
        if not mine.done:
            self._lead()
        if mine.error is not None:
            raise mine.error

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._take(self._queue)
        successor: W | None = None
        try:
            self._run(batch)
        finally:
            with self._lock:
                if self._queue:
                    successor = self._queue[0]
                else:
                    self._leading = False
            for waiter in batch:
                waiter.done = True
            if successor is not None:  # first: the next batch starts while this one's callers wake
                successor.wake.set()
            for waiter in batch:
                waiter.wake.set()
