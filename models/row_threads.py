"""A CPU model pass split by rows over threads of its own, each with its own share of torch's threads.

Why: on the CPU a scoring pass runs 2 slices at once, and torch spreads each of its ~800 operations over
all its threads, meeting at a barrier after each one; most of the U-Net's operations are small or bound by
memory, so the threads spend much of the pass waiting for each other. Giving each slice a thread of its
own, with one intra-op thread, keeps every core on one slice's data from start to end: on the 2-core VM
a B70f series scored 0.41-0.42 -> 0.36-0.37 s per slice with the same scores (docs/bench/scoring.md).
Each row's result depends on its own input only, so the rows are those of the batched pass up to float32
rounding (batched and lone passes already differ by ~2e-6; tests/test_row_threads.py).

torch's thread count is per thread (OpenMP), but ``torch.set_num_threads`` also sets the count that every
thread started afterwards inherits; pinning the pool's threads would otherwise leave later threads of the
process (a study scored on a new thread) with one. The pool is pinned once, then a short-lived thread puts
the inherited count back. A forked child (a Celery prefork worker) drops the parent's pool: its threads did
not survive the fork.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

PassFn = Callable[[torch.Tensor], torch.Tensor]

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _forget_pools_after_fork() -> None:
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _pin(barrier: threading.Barrier, threads: int) -> int:
    """Run on each pool thread: settle torch's per-thread count, report the inherited one, then pin."""
    torch.zeros(1 << 16).add_(1)  # torch sets a thread's count lazily, at its first parallel operation
    inherited = torch.get_num_threads()
    barrier.wait()  # every thread has read the inherited count before any of them changes it
    torch.set_num_threads(threads)
    return inherited


def _restore_inherited(threads: int) -> None:
    """Set the count new threads inherit, from a thread that exits at once (no live thread's count moves)."""
    restorer = threading.Thread(target=torch.set_num_threads, args=(threads,), name="btd-torch-threads")
    restorer.start()
    restorer.join()


def row_pool(workers: int, threads_each: int) -> ThreadPoolExecutor:
    """The process's pool of `workers` threads, each running torch with `threads_each` intra-op threads."""
    key = (workers, threads_each)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = ThreadPoolExecutor(workers, thread_name_prefix=f"btd-rows-{workers}x{threads_each}")
            barrier = threading.Barrier(workers)
            inherited = [f.result() for f in [pool.submit(_pin, barrier, threads_each) for _ in range(workers)]]
            _restore_inherited(inherited[0])
            _pools[key] = pool
        return pool


class RowThreads:
    """``fn`` on a (B, ...) batch; on the CPU with B >= 2 and several torch threads, its rows split over a pool.

    `enabled` switches the split off (`benchmarks/scoring_ab.py --switch rows` compares the two in one process).
    """

    def __init__(self, fn: PassFn) -> None:
        self.fn = fn
        self.enabled = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        workers = min(int(x.shape[0]), threads)
        if not self.enabled or x.device.type != "cpu" or workers < 2:
            return self.fn(x)
        pool = row_pool(workers, threads // workers)
        futures: list[Future[torch.Tensor]] = [pool.submit(self.fn, rows) for rows in x.tensor_split(workers)]
        wait(futures)  # all finished before any error is raised: no pass still running on a caller's input
        return torch.cat([future.result() for future in futures])

    def each(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """``fn`` on each of several (B, ...) batches whose shapes may differ, all their rows spread over the
        pool together. Why: a slice whose crop size no other slice of its batch shares is a lone row, and a lone
        row ran on every torch thread, which the U-Net's small operations keep poorly busy (~75 % of 2 cores);
        two lone rows of different sizes now run side by side, one per thread. Each row's result depends on its
        own input only (float32 rounding aside, as for the rows of one batch)."""
        threads = torch.get_num_threads()
        rows = [row for x in batches for row in x.split(1)]
        workers = min(len(rows), threads)
        on_cpu = all(x.device.type == "cpu" for x in batches)
        if not self.enabled or not on_cpu or workers < 2 or len(batches) < 2:
            return [self(x) for x in batches]
        pool = row_pool(workers, threads // workers)
        futures: list[Future[torch.Tensor]] = [pool.submit(self.fn, row) for row in rows]
        wait(futures)
        outputs = iter(future.result() for future in futures)
        return [torch.cat([next(outputs) for _ in range(int(x.shape[0]))]) for x in batches]
