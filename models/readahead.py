"""Decode the next slices on a thread of their own while the model runs on the current batch.

Scoring alternates two kinds of work: reading and decoding DICOM files (pydicom, pixel conversion: one core,
I/O) and the model pass (torch's own threads, which release the GIL; on a GPU, the device). Run in turn,
the model waits for every decode and a GPU idles meanwhile; read ahead, the decode of slice n + k overlaps
the pass over slice n. The queue holds at most `depth` decoded slices, so memory stays bounded by the batch,
not the series.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """The items of `items`, in order, produced by a background thread up to `depth` ahead of the consumer.

    An exception raised by `items` is raised to the consumer at the point where it occurred. A consumer that
    stops early (break, an exception, close()) stops the producer at its next item."""
    if depth < 1:
        yield from items
        return
    buffer: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            _put(_Failure(exc))
            return
        _put(_END)

    def _put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    producer = threading.Thread(target=produce, name="btd-read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        producer.join(timeout=5)
