"""Shared model passes (models/merged_passes.py): inputs of one shape that wait together run as one batch,
each caller gets exactly its own rows, shapes and the row limit are respected, an error reaches every caller
of the failed pass, and the detector's series scored on several threads come out as scored one by one.

Which inputs meet in a pass is decided by the tests (the first pass is held until the others have queued),
not by timing."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from models.merged_passes import MergedPasses

pytestmark = pytest.mark.timeout(120)


def per_row(x: torch.Tensor) -> torch.Tensor:
    """A pass whose rows depend only on their own input row (as a model's do)."""
    return x * 2 + x.flatten(1).sum(dim=1).view(-1, *([1] * (x.dim() - 1)))


class Held:
    """`per_row`, with the first pass held until `release()`; records each pass's row count."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sizes:
            self.entered.set()
            assert self.gate.wait(30)
        self.sizes.append(int(x.shape[0]))
        return per_row(x)


class Caller(threading.Thread):
    def __init__(self, passes: MergedPasses, x: torch.Tensor) -> None:
        super().__init__(daemon=True)
        self.passes, self.x = passes, x
        self.out: torch.Tensor | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.out = self.passes(self.x)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc


def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(3000):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"timed out waiting until {what}")


def run_held(passes: MergedPasses, fn: Held, first: torch.Tensor, later: list[torch.Tensor]) -> list[Caller]:
    """`first` runs a pass held open until every input of `later` has queued behind it."""
    leader = Caller(passes, first)
    leader.start()
    assert fn.entered.wait(30)
    callers = [Caller(passes, x) for x in later]
    for caller in callers:
        caller.start()
    wait_until(lambda: passes.handoff.queued == len(later), "the later callers queue")
    fn.gate.set()
    for thread in (leader, *callers):
        thread.join(30)
        assert not thread.is_alive()
    return [leader, *callers]


def test_inputs_waiting_together_run_as_one_pass_and_each_gets_its_own_rows() -> None:
    fn = Held()
    passes = MergedPasses(fn, max_rows=16)
    inputs = [torch.randn(n, 1, 8, 8) for n in (2, 1, 3, 2)]
    callers = run_held(passes, fn, inputs[0], inputs[1:])
    assert fn.sizes == [2, 6]  # the leader alone, then the three that waited, together
    assert (passes.passes, passes.rows) == (2, 8)
    for caller, x in zip(callers, inputs, strict=True):
        assert caller.error is None
        assert caller.out is not None and torch.equal(caller.out, per_row(x))


def test_only_one_shape_per_pass_and_never_more_rows_than_the_limit() -> None:
    fn = Held()
    passes = MergedPasses(fn, max_rows=4)
    later = [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 16, 8), torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)]
    callers = run_held(passes, fn, torch.randn(1, 1, 8, 8), later)
    # after the leader's pass: the two 8x8 inputs that fit in 4 rows, the 16x8 one, the last 8x8 one
    assert fn.sizes == [1, 4, 2, 2]
    for caller in callers:
        assert caller.out is not None and torch.equal(caller.out, per_row(caller.x))
    with pytest.raises(ValueError):
        MergedPasses(per_row, max_rows=0)


def test_a_failed_pass_fails_its_callers_and_the_next_pass_runs() -> None:
    fn = Held()
    failing = {"shape": (1, 4, 4)}

    def sometimes_failing(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) == failing["shape"]:
            raise RuntimeError("CUDA out of memory (stand-in)")
        return fn(x)

    passes = MergedPasses(sometimes_failing, max_rows=8)
    leader = Caller(passes, torch.randn(1, 1, 8, 8))
    leader.start()
    assert fn.entered.wait(30)
    bad = [Caller(passes, torch.randn(1, 1, 4, 4)) for _ in range(2)]
    good = Caller(passes, torch.randn(1, 1, 8, 8))
    for caller in (*bad, good):
        caller.start()
    wait_until(lambda: passes.handoff.queued == 3, "the later callers queue")
    fn.gate.set()
    for thread in (leader, *bad, good):
        thread.join(30)
    assert all(isinstance(c.error, RuntimeError) for c in bad)
    assert leader.error is None and good.error is None
    assert good.out is not None and torch.equal(good.out, per_row(good.x))
    assert passes.passes == 2  # the failed pass is not counted; later callers were not held back by it
    assert passes(torch.ones(1, 1, 8, 8)).shape == (1, 1, 8, 8)  # and the lead was handed back


def test_series_scored_on_threads_sharing_the_passes_come_out_as_scored_one_by_one(tmp_path) -> None:  # noqa: ANN001
    """The shipped detector on a real CT series split in two halves (two series of one study): scored two at
    a time through shared passes, every slice's score and verdict equals the one-at-a-time run (up to float
    rounding of batched arithmetic), the study-wide progress only rises and ends at the total."""
    from pathlib import Path

    from models import Detector
    from worker import pipeline

    files = sorted((Path(__file__).parent / "fixtures" / "ct_series_20").glob("CT.*"))
    halves = [files[: len(files) // 2], files[len(files) // 2 :]]
    series = [
        pipeline.SeriesInput(f"half-{k}", "CT", [pipeline.SpoolFile(p.name, p, None) for p in half])
        for k, half in enumerate(halves)
    ]
    detector = Detector.load(device="cpu")
    runs = {}
    for threads in (1, 2):
        seen: list[tuple[int, int]] = []
        runs[threads] = pipeline.score_study_files(
            detector, "2.25.1", series, tmp_path / str(threads), lambda d, t, _s=seen: _s.append((d, t)), None, threads
        )
        assert seen[-1] == (len(files), len(files))
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    one, two = runs[1], runs[2]
    assert [s.series_uid for s in two.series] == ["half-0", "half-1"]  # the study's order, whoever finished first
    assert two.verdict == one.verdict
    for a, b in zip(one.series, two.series, strict=True):
        assert b.result.verdict == a.result.verdict
        assert b.result.score == pytest.approx(a.result.score, abs=1e-5)
        for x, y in zip(a.result.instances, b.result.instances, strict=True):
            assert (y.sop_instance_uid, y.verdict) == (x.sop_instance_uid, x.verdict)
            assert y.score == pytest.approx(x.score, abs=1e-5)
    assert pipeline.series_threads(detector, None) == 1  # the CPU default; a GPU's is 4
