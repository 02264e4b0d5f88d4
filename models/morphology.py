"""Binary erosion, dilation, opening, closing and hole filling of 2-D masks, value for value scipy.ndimage's.

Why not scipy's own: its binary morphology visits the structure's pixels around each pixel in a C loop, and
with `iterations > 1` it tracks changed pixels in lists; for the masks scoring computes per slice (the body,
the lungs, their dilations: the 4-connected cross and the 3 x 3 square, outside the image taken as False)
that was ~8 ms of a B70f slice's ~56 ms of CPU besides the U-Net (py-spy, 2026-12-05, docs/bench/scoring.md).
Here each step is a handful of whole-image boolean operations on shifted views (erosion: the pixel AND its
neighbours; dilation: OR), the square done as a row step then a column step, which is the same set;
hole filling labels the background once and keeps what does not touch the image's edge, which is the set
scipy's propagation from the border reaches. Every result is the same boolean array as scipy's
(tests/test_exact_shortcuts.py), so no mask, map or verdict can change.

Only what the scoring path uses is offered: 2-D input, those two structures, border value 0 (scipy's
default), no mask or origin. Anything else goes to scipy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _axis_step(mask: np.ndarray, grow: bool, axis: int) -> np.ndarray:
    """One erosion (grow=False) or dilation step along one axis: each pixel combined with its two
    neighbours on that axis, a neighbour outside the image counting as False."""
    out = mask.copy()
    ahead = (slice(1, None), slice(None)) if axis == 0 else (slice(None), slice(1, None))
    behind = (slice(None, -1), slice(None)) if axis == 0 else (slice(None), slice(None, -1))
    if grow:
        out[ahead] |= mask[behind]
        out[behind] |= mask[ahead]
    else:
        out[ahead] &= mask[behind]
        out[behind] &= mask[ahead]
        if axis == 0:
            out[[0, -1], :] = False
        else:
            out[:, [0, -1]] = False
    return out


def _cross_step(mask: np.ndarray, grow: bool) -> np.ndarray:
    """One step with the 4-connected cross: every neighbour read from the step's input."""
    out = mask.copy()
    if grow:
        out[1:, :] |= mask[:-1, :]
        out[:-1, :] |= mask[1:, :]
        out[:, 1:] |= mask[:, :-1]
        out[:, :-1] |= mask[:, 1:]
    else:
        out[1:, :] &= mask[:-1, :]
        out[:-1, :] &= mask[1:, :]
        out[:, 1:] &= mask[:, :-1]
        out[:, :-1] &= mask[:, 1:]
        out[0, :] = out[-1, :] = False
        out[:, 0] = out[:, -1] = False
    return out


def _iterate(mask: np.ndarray, iterations: int, grow: bool, square: bool) -> np.ndarray:
    current = np.asarray(mask, dtype=bool)
    for _ in range(iterations):
        current = _axis_step(_axis_step(current, grow, 1), grow, 0) if square else _cross_step(current, grow)
    return current  # a new array: every step copies


def _fast(mask: np.ndarray, iterations: int) -> bool:
    return np.ndim(mask) == 2 and min(np.shape(mask)) >= 1 and iterations >= 1


def erode(mask: np.ndarray, iterations: int = 1, *, square: bool = False) -> np.ndarray:
    """ndimage.binary_erosion(mask, iterations=...), with the 3 x 3 square as structure if `square`."""
    if not _fast(mask, iterations):
        return ndimage.binary_erosion(mask, structure=np.ones((3, 3)) if square else None, iterations=iterations)
    return _iterate(mask, iterations, grow=False, square=square)


def dilate(mask: np.ndarray, iterations: int = 1, *, square: bool = False) -> np.ndarray:
    """ndimage.binary_dilation(mask, iterations=...), with the 3 x 3 square as structure if `square`."""
    if not _fast(mask, iterations):
        return ndimage.binary_dilation(mask, structure=np.ones((3, 3)) if square else None, iterations=iterations)
    return _iterate(mask, iterations, grow=True, square=square)


def opening(mask: np.ndarray, iterations: int = 1, *, square: bool = False) -> np.ndarray:
    """ndimage.binary_opening: erosion, then dilation, each `iterations` times."""
    return dilate(erode(mask, iterations, square=square), iterations, square=square)


def closing(mask: np.ndarray, iterations: int = 1, *, square: bool = False) -> np.ndarray:
    """ndimage.binary_closing: dilation, then erosion, each `iterations` times (outside the image False)."""
    return erode(dilate(mask, iterations, square=square), iterations, square=square)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """ndimage.binary_fill_holes: the mask with every background region (4-connected) that does not touch
    the image's edge added to it."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.size == 0:
        return ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(~mask)
    outside = np.zeros(count + 1, dtype=bool)
    outside[0] = True  # label 0 is the mask itself: kept through `| mask` below
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        outside[edge] = True
    return ~outside[labels] | mask
