"""Decoding ahead (models/readahead.py) keeps order, bounds memory, passes errors on, and stops with its consumer;
a detector reading ahead scores a real series exactly as one that does not."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.readahead import read_ahead

SERIES = Path(__file__).parent / "fixtures" / "ct_series_20"


def test_items_arrive_in_order_and_all_of_them() -> None:
    assert list(read_ahead(iter(range(1000)), depth=3)) == list(range(1000))
    assert list(read_ahead(iter(range(5)), depth=0)) == list(range(5))  # 0: no thread, same items


def test_the_producer_stays_at_most_depth_ahead() -> None:
    produced: list[int] = []

    def source() -> Iterator[int]:
        for n in range(100):
            produced.append(n)
            yield n

    items = read_ahead(source(), depth=4)
    assert next(items) == 0
    time.sleep(0.3)  # time for the producer to run as far ahead as it may
    # consumed 1, four waiting in the queue, one in the producer's hand blocked on the full queue
    assert len(produced) <= 1 + 4 + 1
    assert list(items) == list(range(1, 100))


def test_an_error_of_the_source_reaches_the_consumer_where_it_happened() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item in read_ahead(source(), depth=2):
            seen.append(item)
    assert seen == [1, 2]


def test_a_consumer_that_stops_early_stops_the_producer() -> None:
    def source() -> Iterator[int]:
        n = 0
        while True:
            yield n
            n += 1

    before = threading.active_count()
    items = read_ahead(source(), depth=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_a_detector_reading_ahead_scores_a_series_the_same() -> None:
    from models.detector import Detector

    files = sorted(SERIES.glob("CT.*"))[:6]
    plain = Detector.load(None, device="cpu", read_ahead=0).score_series(files)
    ahead = Detector.load(None, device="cpu", read_ahead=2).score_series(files)
    assert ahead.verdict == plain.verdict and ahead.score == plain.score
    assert [(i.sop_instance_uid, i.score, i.verdict) for i in ahead.instances] == [
        (i.sop_instance_uid, i.score, i.verdict) for i in plain.instances
    ]
    assert len(plain.instances) == 6


def test_read_ahead_must_not_be_negative() -> None:
    from models.detector import Detector, DetectorError

    with pytest.raises(DetectorError, match="read_ahead"):
        Detector.load(None, device="cpu", read_ahead=-1)
