"""Results of pure functions of an image, kept for the last few images and found again by content.

Scoring asks for the same derived images several times: a slice's body and lung masks (where the model runs,
its search region, the tissue features, the cues), and the continuity cue's smoothing and envelopes (each
slice is judged, then serves as the neighbour of the next two). Keyed by a digest of the bytes, shape and
type, a result is reused only for an identical image, so nothing computed can differ.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

ImageKey = tuple[tuple[int, ...], str, bytes]


def image_key(image: np.ndarray) -> ImageKey:
    """What identifies an image's content: shape, type and a 128-bit digest of its bytes.

    SHA-256 (cut to 128 bits) rather than BLAKE2b: on x86 CPUs with the SHA extensions (AMD since Zen, Intel
    servers since Ice Lake) OpenSSL's SHA-256 hashes a 512 x 512 float32 slice in 0.6-0.9 ms against BLAKE2b's
    2.0 (2026-12-04, AMD EPYC VM). A frozen image (see `_frozen`) is hashed once and its key remembered for as
    long as the array lives: a slice is keyed about five times while it is scored (its masks, and the
    continuity cue as the slice itself and as each neighbour's neighbour), ~3 ms of a B70f slice's ~48 ms of
    CPU besides the U-Net (2026-12-05, docs/bench/scoring.md).
    """
    frozen = _frozen(image)
    if frozen:
        entry = _remembered_keys.get(id(image))
        if entry is not None and entry[0]() is image:
            return entry[1]
    key = (image.shape, image.dtype.str, hashlib.sha256(np.ascontiguousarray(image).data).digest()[:16])
    if frozen:
        identity = id(image)

        def forget(ref: weakref.ref[np.ndarray]) -> None:
            if _remembered_keys.get(identity, (None,))[0] is ref:
                _remembered_keys.pop(identity, None)

        _remembered_keys[identity] = (weakref.ref(image, forget), key)
    return key


# Keys of frozen images by id(): an entry lives as long as its array (the weak reference's callback drops it),
# and is only trusted for the very array it was made for (an id is reused once its array is gone). No lock:
# single dict operations are atomic, and a callback may run inside any allocation, where a lock this thread
# already held would deadlock. The worst a race can do is drop a newer entry for a reused id: one more hash.
_remembered_keys: dict[int, tuple[weakref.ref[np.ndarray], ImageKey]] = {}


def _frozen(image: np.ndarray) -> bool:
    """Whether nobody can change the image's bytes any more: it and the array it views are read-only, and at
    the bottom is an array that owns its memory (made read-only by whoever made it, as models.series does
    with every decoded slice) or an immutable bytes object. A writeable array, or a read-only view of a
    writeable one, is hashed on every call."""
    current: object = image
    while isinstance(current, np.ndarray):
        if current.flags.writeable:
            return False
        current = current.base
    return current is None or isinstance(current, bytes)


class ContentCache:
    """Per image (by `image_key`), named results; the images used longest ago are dropped beyond `slots`.

    Results are stored read-only and handed out shared: a caller that changes one must copy it first."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._entries: OrderedDict[ImageKey, dict[Hashable, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: ImageKey, name: Hashable, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The result `name` of the image `key`, computed (outside the lock) the first time it is asked for."""
        with self._lock:
            entry = self._entries.setdefault(key, {})
            self._entries.move_to_end(key)
            while len(self._entries) > self.slots:
                self._entries.popitem(last=False)
            found = entry.get(name)
        if found is not None:
            return found
        value = compute()
        value.setflags(write=False)
        with self._lock:
            entry[name] = value
        return value

    def find(self, key: ImageKey, name: Hashable) -> Any:
        """The result `name` of the image `key` if it is kept (the image counts as used), else None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.get(name)

    def keep(self, key: ImageKey, name: Hashable, value: Any) -> None:
        """Keep `value` as the result `name` of the image `key`, replacing what was there (an array is made
        read-only; anything else must not change: a frozen dataclass of read-only arrays)."""
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
        with self._lock:
            entry = self._entries.setdefault(key, {})
            self._entries.move_to_end(key)
            while len(self._entries) > self.slots:
                self._entries.popitem(last=False)
            entry[name] = value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
