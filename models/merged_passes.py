"""Model passes shared by threads: same-shape inputs that wait at the same moment run as one batch.

Why: a study has several series (and a worker may score several studies), each scored on a thread of its
own; on a GPU a pass over 2 or 3 crops costs nearly what a pass over 16 does, and the whole-slice mode
batches only crops of one shape, so one series alone leaves the device mostly idle between small passes.
Here the passes the threads ask for while the device is busy are gathered and run together: cross-series
(and cross-study) batching without a timer, so one thread alone is never held back.

How (models/handoff.py, as the listener's group commit): a caller queues its input and, if no pass is
running, runs one: it takes the queued inputs of the first queued input's shape, up to `max_rows` rows in
all (its own first), runs them as one batch and hands each caller its rows; callers that queued meanwhile
sleep, and the lead passes to the first one still queued. A model's rows depend only on their own
input, so each caller gets the rows it would have got alone, up to the rounding of batched arithmetic (a
batched pass differed from lone ones by ~6e-8 on the CPU, as two slices of one series batched together
already do; tests/test_merged_passes.py holds scores to 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.handoff import Handoff, Waiter

PassFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class _Request(Waiter):
    """One caller's input (B, ...) waiting for its output rows."""

    x: torch.Tensor
    out: torch.Tensor | None = None

    @property
    def key(self) -> tuple[object, ...]:
        return (tuple(self.x.shape[1:]), self.x.dtype, self.x.device)


class MergedPasses:
    """Call `fn` on batches merged from concurrent callers; `__call__(x)` returns `fn`'s rows for `x`."""

    def __init__(self, fn: PassFn, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.fn = fn
        self.max_rows = max_rows
        self.passes = 0  # passes run and rows through them (tests, benchmarks)
        self.rows = 0
        self.handoff: Handoff[_Request] = Handoff(self._take, self._run)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mine = _Request(x)
        self.handoff.wait_turn(mine)
        assert mine.out is not None
        return mine.out

    def _take(self, queue: list[_Request]) -> tuple[list[_Request], list[_Request]]:
        """The first queued request and the others of its shape that fit in one pass."""
        first = queue[0]
        batch, rows, rest = [first], first.x.shape[0], []
        for request in queue[1:]:
            if request.key == first.key and rows + request.x.shape[0] <= self.max_rows:
                batch.append(request)
                rows += request.x.shape[0]
            else:
                rest.append(request)
        return batch, rest

    def _run(self, batch: list[_Request]) -> None:
        try:
            x = batch[0].x if len(batch) == 1 else torch.cat([request.x for request in batch])
            out = self.fn(x)
            self.passes += 1
            self.rows += int(x.shape[0])
        except BaseException as exc:  # every caller of a failed pass gets its error
            for request in batch:
                request.error = exc
            return
        start = 0
        for request in batch:
            n = int(request.x.shape[0])
            request.out = out[start : start + n]
            start += n
