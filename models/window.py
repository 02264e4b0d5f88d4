"""A rectangle of a slice, and local filters computed only inside it.

Why: a slice's maps are read only inside its search region (the dilated lungs): every value outside is set
to one floor below them (models/anomaly.py `finish`, models/cues `masked_max`). A chest slice's lungs and
their margins cover 35-80 % of the image, yet the filters behind the maps (the tissue bins' Gaussian and
box means, the residual's local energy, the continuity cue's smoothing and envelopes) ran over all of it.
Here each runs on the rectangle the maps need, widened by the filter's own reach, and the widened border is
cut off again.

Exactness: a value at least `reach` pixels inside a cut edge reads only pixels the whole-image filter reads,
and a rectangle that meets the image's edge keeps that edge, where scipy's "reflect" (numpy's "symmetric")
extends it the same way. Gaussians, Sobel and maxima / minima are computed per pixel from their
neighbourhood, so they come out value for value; scipy's box mean (`uniform_filter`) keeps a running sum
along each line, whose float64 rounding depends on where the line starts: over a real slice's values it
matches too, over residual energies spanning many decades ~1 value in 20,000 differs in its last float32 bit
(tests/test_window.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """Rows [top, bottom) and columns [left, right) of an image of `shape`."""

    top: int
    bottom: int
    left: int
    right: int
    shape: tuple[int, int]

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> Window:
        rows, columns = int(shape[0]), int(shape[1])
        return cls(0, rows, 0, columns, (rows, columns))

    @classmethod
    def around(cls, mask: np.ndarray, margin: int) -> Window:
        """The smallest rectangle holding every True pixel of `mask`, widened by `margin` (the whole image
        when `mask` is empty: nothing to bound)."""
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return cls.whole(mask.shape)
        columns = np.flatnonzero(mask.any(axis=0))
        inner = cls(int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1, mask.shape[:2])
        return inner.grown(margin)

    @property
    def index(self) -> tuple[slice, slice]:
        """The window's part of a whole image: `image[window.index]`."""
        return slice(self.top, self.bottom), slice(self.left, self.right)

    @property
    def is_whole(self) -> bool:
        return (self.top, self.left, self.bottom, self.right) == (0, 0, *self.shape)

    def grown(self, px: int) -> Window:
        """`px` more on every side, within the image."""
        rows, columns = self.shape
        return Window(
            max(self.top - px, 0), min(self.bottom + px, rows), max(self.left - px, 0), min(self.right + px, columns),
            self.shape,
        )

    def holds(self, other: Window) -> bool:
        return (
            self.top <= other.top and other.bottom <= self.bottom and self.left <= other.left
            and other.right <= self.right
        )

    def union(self, other: Window) -> Window:
        """The smallest window holding both."""
        return Window(
            min(self.top, other.top), max(self.bottom, other.bottom), min(self.left, other.left),
            max(self.right, other.right), self.shape,
        )

    def within(self, outer: Window) -> tuple[slice, slice]:
        """This window's part of an array that covers `outer` (which must hold it)."""
        if not outer.holds(self):
            raise ValueError(f"{self} is not inside {outer}")
        return (
            slice(self.top - outer.top, self.bottom - outer.top),
            slice(self.left - outer.left, self.right - outer.left),
        )

    def filtered(self, image: np.ndarray, reach: int, local: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """`local(image)[..., window]`, computing `local` only on this window widened by `reach`: `local` is a
        filter whose every output pixel reads input pixels at most `reach` away (on each of the image's last
        two axes, the rows and columns; leading axes such as a residual's channels pass through)."""
        if self.is_whole:
            return local(image)
        outer = self.grown(reach)
        return local(image[(..., *outer.index)])[(..., *self.within(outer))]

    def pasted(self, part: np.ndarray, fill: float, dtype: type = np.float32) -> np.ndarray:
        """A new whole image holding `part` in this window and `fill` everywhere else (a copy even for a whole
        window, so a caller may write into it and leave `part` intact)."""
        if self.is_whole:
            return np.array(part, dtype=dtype)
        whole = np.full(self.shape, fill, dtype=dtype)
        whole[self.index] = part
        return whole


def uniform_reach(size: int) -> int:
    """How far scipy's `uniform_filter(size=size)` reads from a pixel (origin 0): size // 2 on one side."""
    return size // 2


def gaussian_reach(sigma: float, truncate: float = 4.0) -> int:
    """How far scipy's `gaussian_filter(sigma)` reads from a pixel: its kernel radius."""
    return int(truncate * float(sigma) + 0.5)
