"""A CPU pass split by rows over threads (models/row_threads.py): the rows of the batched pass, each thread with
its share of torch's threads, errors passed on, and the count later threads inherit left as it was."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from models.row_threads import RowThreads


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _inherited_count() -> int:
    """torch's thread count in a thread started now, once it has run a parallel operation."""
    seen: list[int] = []

    def probe() -> None:
        torch.zeros(1 << 16).add_(1)
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return seen[0]


def test_rows_run_on_threads_of_their_own_with_one_torch_thread_each(two_torch_threads: None) -> None:
    calls: list[tuple[str, int, int]] = []
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))

    both_running = threading.Barrier(2, timeout=30)  # the two halves run at the same time, on two threads

    def rows_pass(x: torch.Tensor) -> torch.Tensor:
        calls.append((threading.current_thread().name, torch.get_num_threads(), int(x.shape[0])))
        both_running.wait()
        return torch.tanh(x @ weight)

    x = torch.randn(5, 100, 32, generator=torch.Generator().manual_seed(2))
    split = RowThreads(rows_pass)(x)
    whole = torch.tanh(x @ weight)
    assert split.shape == whole.shape
    assert (split - whole).abs().max().item() <= 1e-6
    pooled = list(calls)
    assert sorted(rows for _, _, rows in pooled) == [2, 3]
    assert all(name.startswith("btd-rows-2x1") and threads == 1 for name, threads, _ in pooled)
    assert len({name for name, _, _ in pooled}) == 2
    assert torch.get_num_threads() == 2  # the caller keeps its count
    assert _inherited_count() == 2  # and so do threads started later


def test_one_row_one_thread_or_switched_off_runs_on_the_callers_thread(two_torch_threads: None) -> None:
    names: list[str] = []

    def rows_pass(x: torch.Tensor) -> torch.Tensor:
        names.append(threading.current_thread().name)
        return x * 2

    rows = RowThreads(rows_pass)
    rows(torch.ones(1, 4))
    rows.enabled = False
    rows(torch.ones(3, 4))
    rows.enabled = True
    torch.set_num_threads(1)
    rows(torch.ones(3, 4))
    assert names == [threading.current_thread().name] * 3


def test_an_error_in_one_rows_pass_reaches_the_caller(two_torch_threads: None) -> None:
    def rows_pass(x: torch.Tensor) -> torch.Tensor:
        if x[0, 0] > 0:
            raise RuntimeError("out of memory in a row pass")
        return x

    x = torch.tensor([[-1.0], [1.0]])
    with pytest.raises(RuntimeError, match="out of memory in a row pass"):
        RowThreads(rows_pass)(x)


def test_a_forked_child_forgets_its_parents_pool(two_torch_threads: None) -> None:
    """The parent's pool threads do not exist in a forked child (a Celery prefork worker): the child must build
    its own pool instead of queueing work for threads that will never take it. The child only reads the pool
    registry and leaves with os._exit: GNU OpenMP hangs in a child forked after its parent ran parallel torch
    operations (the Celery parent never imports torch), and the child must not run the parent's exit hooks."""
    from models import row_threads

    RowThreads(lambda x: x)(torch.zeros(2, 3))  # the parent's pool exists
    assert len(row_threads._pools) >= 1
    pid = os.fork()
    if pid == 0:  # the child
        os._exit(0 if not row_threads._pools else 3)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not exit")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child still knew its parent's pool"


def test_lone_rows_of_different_shapes_run_side_by_side_and_come_back_in_order(two_torch_threads: None) -> None:
    """Two crops of different sizes, one row each, run at once on the pool's two threads (one torch thread
    each) instead of one after the other; a batch of two rows beside them keeps its rows together and in order."""
    calls: list[tuple[str, int, tuple[int, ...]]] = []
    both_running = threading.Barrier(2, timeout=30)

    def rows_pass(x: torch.Tensor) -> torch.Tensor:
        calls.append((threading.current_thread().name, torch.get_num_threads(), tuple(x.shape)))
        if x.shape[1] in (7, 9):  # the two lone rows must meet: they run at the same time
            both_running.wait()
        return x.flip(-1) * 2

    generator = torch.Generator().manual_seed(3)
    lone_a, lone_b = torch.randn(1, 7, 11, generator=generator), torch.randn(1, 9, 5, generator=generator)
    outputs = RowThreads(rows_pass).each([lone_a, lone_b])
    assert [tuple(o.shape) for o in outputs] == [(1, 7, 11), (1, 9, 5)]
    assert torch.equal(outputs[0], lone_a.flip(-1) * 2) and torch.equal(outputs[1], lone_b.flip(-1) * 2)
    assert {threads for _, threads, _ in calls} == {1}
    assert len({name for name, _, _ in calls}) == 2 and all(name.startswith("btd-rows-2x1") for name, _, _ in calls)

    pair = torch.randn(2, 4, 4, generator=generator)
    lone, paired = RowThreads(lambda x: x + 1).each([lone_a, pair])
    assert torch.equal(lone, lone_a + 1) and torch.equal(paired, pair + 1)


def test_batches_side_by_side_pass_on_an_error_after_every_row_has_finished(two_torch_threads: None) -> None:
    finished: list[int] = []

    def rows_pass(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            raise RuntimeError("bad crop")
        time.sleep(0.2)
        finished.append(int(x.shape[1]))
        return x

    with pytest.raises(RuntimeError, match="bad crop"):
        RowThreads(rows_pass).each([torch.zeros(1, 3, 3), torch.zeros(1, 5, 5)])
    assert finished == [5]  # the other crop's pass was not abandoned while it ran on the caller's input


def test_batches_side_by_side_fall_back_to_one_at_a_time_with_one_torch_thread() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names: list[str] = []

        def rows_pass(x: torch.Tensor) -> torch.Tensor:
            names.append(threading.current_thread().name)
            return x * 3

        caller = threading.current_thread().name
        out = RowThreads(rows_pass).each([torch.ones(1, 2, 2), torch.ones(1, 3, 3)])
        assert [o.sum().item() for o in out] == [12.0, 27.0] and names == [caller, caller]
    finally:
        torch.set_num_threads(previous)
