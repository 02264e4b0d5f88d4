"""The next model pass run while the batch before it is finished (models/pass_ahead.py): a detector scores a
real series, with a broken slice in the middle, exactly as it does with passes in turn; errors reach the caller."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers_fork import result_in_forked_child

from models.corpus import DEFAULT_DATA_ROOT
from models.pass_ahead import PassAhead

LIDC2 = DEFAULT_DATA_ROOT / "lidc-idri" / "LIDC-IDRI-0002"


def test_results_in_submission_order_on_one_thread_of_its_own() -> None:
    ahead = PassAhead()
    names: list[str] = []

    def work(n: int) -> int:
        names.append(threading.current_thread().name)
        return n * n

    futures = [ahead.submit(work, n) for n in range(20)]
    assert [f.result() for f in futures] == [n * n for n in range(20)]
    assert set(names) == {names[0]} and names[0].startswith("btd-pass-ahead")


def test_switched_off_it_runs_on_the_callers_thread_and_keeps_errors_for_result() -> None:
    ahead = PassAhead()
    ahead.enabled = False
    assert ahead.submit(threading.current_thread).result() is threading.current_thread()
    failed = ahead.submit(int, "not a number")
    assert failed.done()
    with pytest.raises(ValueError):
        failed.result()


def test_a_forked_child_gets_a_thread_of_its_own() -> None:
    ahead = PassAhead()
    assert ahead.submit(sum, [1]).result() == 1  # the parent's thread exists
    assert result_in_forked_child(lambda: ahead.submit(sum, [1, 2, 3]).result(timeout=20)) == 6


@pytest.fixture
def series_with_a_broken_slice(tmp_path: Path) -> list[Path]:
    """A real chest CT series (12 slices with lungs), the sixth along the body with its pixel data truncated: not
    assessed, it breaks the chain of neighbours, so everything before it is finished there, the fifth slice too,
    whose pass (a batch of one, the detector batching two) is still ahead when the broken slice is read."""
    if not LIDC2.is_dir():
        pytest.skip("shared chest-CT corpus not present")
    files = sorted(LIDC2.rglob("*.dcm"), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation))
    copies = [Path(shutil.copy(f, tmp_path / f"{n:02d}.dcm")) for n, f in enumerate(files)]
    broken = pydicom.dcmread(copies[5])
    broken.PixelData = broken.PixelData[:100]
    broken.save_as(copies[5])
    return copies


def test_a_detector_passing_ahead_scores_a_series_the_same(series_with_a_broken_slice: list[Path]) -> None:
    from models.detector import Detector

    detector = Detector.load(None, device="cpu")
    pass_threads: list[str] = []
    residual_maps = detector.residual_maps

    def recorded(slices: list[np.ndarray]) -> list[np.ndarray]:
        pass_threads.append(threading.current_thread().name)
        return residual_maps(slices)

    detector.residual_maps = recorded  # type: ignore[method-assign]
    ahead = detector.score_series(series_with_a_broken_slice)
    assert pass_threads and all(name.startswith("btd-pass-ahead") for name in pass_threads)
    detector.pass_ahead.enabled = False
    in_turn = detector.score_series(series_with_a_broken_slice)
    assert pass_threads[-1] == threading.current_thread().name

    def summary(result: object) -> list[tuple[object, ...]]:
        return [(i.sop_instance_uid, i.score, i.verdict, i.reason) for i in result.instances]  # type: ignore[attr-defined]

    assert summary(ahead) == summary(in_turn)
    in_slice_order = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series_with_a_broken_slice]
    assert [i.sop_instance_uid for i in ahead.instances] == in_slice_order  # the fifth before the broken sixth
    assert (ahead.verdict, ahead.score) == (in_turn.verdict, in_turn.score)
    assert [c.score for c in ahead.cues] == [c.score for c in in_turn.cues]
    scored = [i for i in ahead.instances if i.score is not None]
    assert len(ahead.instances) == 12 and len(scored) >= 9
    assert sum("corrupt or truncated" in (i.reason or "") for i in ahead.instances) == 1


def test_an_error_in_a_pass_ahead_reaches_the_caller(series_with_a_broken_slice: list[Path]) -> None:
    from models.detector import Detector

    detector = Detector.load(None, device="cpu")
    calls = 0

    def failing(slices: list[np.ndarray]) -> list[np.ndarray]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise MemoryError("no memory for the second batch")
        return Detector.residual_maps(detector, slices)

    detector.residual_maps = failing  # type: ignore[method-assign]
    with pytest.raises(MemoryError, match="second batch"):
        detector.score_series(series_with_a_broken_slice)
